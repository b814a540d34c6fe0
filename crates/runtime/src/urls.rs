//! URLs in messages: the password of a broker or database URL never reaches a log line.

/// Hides the password of a URL before it goes into a message.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Why a broker URL (or a comma-separated list of a cluster's) cannot work, if it cannot.
pub fn amqp_url_problem(urls: &str) -> Option<String> {
    let mut any = false;
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        any = true;
        let shown = redact(url);
        let parsed = match url::Url::parse(url) {
            Ok(u) => u,
            Err(url::ParseError::EmptyHost) => return Some(format!("{shown:?} names no host")),
            Err(e) => {
                return Some(format!(
                    "{shown:?} is not a URL ({e}); expected amqp://USER:PASSWORD@HOST:5672/VHOST"
                ));
            }
        };
        match parsed.scheme() {
            "amqp" => {}
            "amqps" => {
                return Some(format!(
                    "{shown:?}: amqps:// (TLS) is not supported; use amqp:// to a broker inside the \
                     cluster, or a TLS sidecar"
                ));
            }
            other => {
                return Some(format!(
                    "{shown:?}: a {other}:// URL is not RabbitMQ's; expected amqp://USER:PASSWORD@HOST:5672/VHOST"
                ));
            }
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Some(format!("{shown:?} names no host"));
        }
    }
    (!any).then(|| "no broker address given".to_owned())
}

/// Why a PostgreSQL server URL cannot work, if it cannot.
pub fn database_url_problem(url: &str) -> Option<String> {
    let shown = redact(url);
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(url::ParseError::EmptyHost) => return Some(format!("{shown:?} names no host")),
        Err(e) => {
            return Some(format!(
                "{shown:?} is not a URL ({e}); expected postgres://USER@HOST:5432"
            ));
        }
    };
    match parsed.scheme() {
        "postgres" | "postgresql" => {}
        other => {
            return Some(format!(
                "{shown:?}: a {other}:// URL; only PostgreSQL is supported (postgres://USER@HOST:5432)"
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Some(format!("{shown:?} names no host"));
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_that_cannot_work_are_named_with_the_reason() {
        use super::{amqp_url_problem as amqp, database_url_problem as pg};
        assert_eq!(amqp("amqp://guest:guest@h:5672/%2f"), None);
        assert_eq!(amqp("amqp://a:5672, amqp://b:5672"), None);
        assert!(amqp("not-a-url").unwrap().contains("not a URL"));
        assert!(amqp("http://h:15672").unwrap().contains("not RabbitMQ"));
        assert!(amqp("amqps://h").unwrap().contains("TLS"));
        assert!(amqp("amqp://x:secret@").unwrap().contains("no host"));
        assert!(!amqp("amqps://x:secret@h").unwrap().contains("secret"));
        assert_eq!(pg("postgres://postgres@127.0.0.1:5432"), None);
        assert!(pg("postgres//oops").unwrap().contains("not a URL"));
        assert!(pg("mysql://root@h").unwrap().contains("only PostgreSQL"));
        assert!(pg("postgres://").unwrap().contains("no host"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(
            super::redact("postgres://postgres@h:5432"),
            "postgres://postgres@h:5432"
        );
    }
}
