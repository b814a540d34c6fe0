//! A namespace's files, databases and queues: the data directory's lock (one process per
//! directory and namespace) and `ldt purge`.

use anyhow::Context as _;
use ldt_contract::{Queues, Service};

use crate::bus::Bus;
use crate::configuration::Settings;

/// Takes the data directory's lock for the namespace, when the settings keep files there.
pub fn lock_data_dir(settings: &Settings) -> anyhow::Result<Option<std::fs::File>> {
    if !settings.uses_data_dir() {
        return Ok(None);
    }
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let path = dir.join(format!("{}.lock", settings.namespace));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another ldt process is using the data directory {} (namespace {:?}); stop it, \
             or give this one another --data-dir or --namespace",
            dir.display(),
            settings.namespace
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}

/// Drops every database and deletes every queue of the settings' namespace (the embedded
/// mode's files in the data directory included); what it deleted, one line each. It creates
/// nothing: a data directory that does not exist has nothing to delete.
pub async fn purge(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let mut deleted = Vec::new();
    let dir_exists = settings.data_dir.is_dir();
    let _lock = if settings.uses_data_dir() && dir_exists {
        lock_data_dir(settings)?
    } else {
        None
    };
    for service in Service::ALL {
        let backend = settings.backend_for(service);
        let uses_files = matches!(backend, crate::db::Backend::Sqlite { dir: Some(_) });
        if !uses_files || dir_exists {
            let name = settings.database_name(service);
            let what = backend.describe(&name);
            if crate::db::drop_database(&backend, &name)
                .await
                .with_context(|| format!("dropping {what}"))?
            {
                deleted.push(format!("dropped {what}"));
            }
        }
    }
    match &settings.amqp_url {
        Some(url) => {
            let queues = Queues::new(&settings.namespace);
            // Declare nothing: a declaration with other arguments than the queue's would fail.
            let bus = Bus::amqp(url, Vec::new(), None)
                .await
                .context("connecting to RabbitMQ")?;
            bus.delete_queues(&queues.all())
                .await
                .context("deleting queues")?;
            deleted.push(format!("deleted the queues {}", queues.all().join(", ")));
        }
        None => {
            if let Some(journal) = settings.bus_journal() {
                for suffix in ["", "-wal", "-shm"] {
                    let mut path = journal.clone().into_os_string();
                    path.push(suffix);
                    let path = std::path::PathBuf::from(path);
                    match std::fs::remove_file(&path) {
                        Ok(()) => deleted.push(format!("deleted {}", path.display())),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(anyhow::Error::new(e)
                                .context(format!("deleting {}", path.display())));
                        }
                    }
                }
            }
        }
    }
    if settings.uses_data_dir() && dir_exists {
        let _ = std::fs::remove_file(
            settings
                .data_dir
                .join(format!("{}.lock", settings.namespace)),
        );
    }
    Ok(deleted)
}
