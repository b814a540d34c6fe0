//! What crosses the bus, whichever the transport: a message to publish ([`Outgoing`],
//! several of which may travel as one bundle), a delivery to settle ([`Incoming`]), the
//! errors, and how queues are declared.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ldt_contract::Envelope;

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub queue: String,
    pub message_id: String,
    pub payload: Vec<u8>,
    /// String headers (trace context, dead-letter metadata).
    pub headers: Vec<(String, String)>,
}

/// Header marking a message as a bundle of several; its value is the bundle format's version.
pub const BUNDLE_HEADER: &str = "x-ldt-bundle";

/// The bundle format this build writes and reads.
const BUNDLE_FORMAT: &str = "1";

impl Outgoing {
    /// One message carrying `parts`, all bound for `queue`: the broker stores, confirms,
    /// delivers and takes an ack for one message instead of one per part. A subscription hands
    /// the parts out one by one, each with its own id, headers and payload, and settles the
    /// bundle once every part is settled: it is acked when all parts were acked, and delivered
    /// again whole when any part was given back (receivers are idempotent, as they must be for
    /// any redelivery). `None` when a part is too large to frame (4 GiB).
    ///
    /// The payload is binary, so that any payload travels as it is: a part count, then per
    /// part its id, its headers (a count, then name and value each) and its payload, every
    /// count and length a big-endian `u32` before what it counts.
    pub fn bundle(queue: &str, parts: &[Outgoing]) -> Option<Outgoing> {
        fn count(buf: &mut Vec<u8>, n: usize) -> Option<()> {
            buf.extend_from_slice(&u32::try_from(n).ok()?.to_be_bytes());
            Some(())
        }
        fn bytes(buf: &mut Vec<u8>, b: &[u8]) -> Option<()> {
            count(buf, b.len())?;
            buf.extend_from_slice(b);
            Some(())
        }
        let size: usize = parts
            .iter()
            .map(|p| 12 + p.message_id.len() + p.payload.len() + 64 * p.headers.len())
            .sum();
        let mut payload = Vec::with_capacity(4 + size);
        count(&mut payload, parts.len())?;
        for part in parts {
            bytes(&mut payload, part.message_id.as_bytes())?;
            count(&mut payload, part.headers.len())?;
            for (name, value) in &part.headers {
                bytes(&mut payload, name.as_bytes())?;
                bytes(&mut payload, value.as_bytes())?;
            }
            bytes(&mut payload, &part.payload)?;
        }
        Some(Outgoing {
            queue: queue.to_owned(),
            message_id: uuid::Uuid::now_v7().to_string(),
            payload,
            headers: vec![(BUNDLE_HEADER.to_owned(), BUNDLE_FORMAT.to_owned())],
        })
    }
}

/// One part of a bundle: its id, headers and payload.
pub(crate) type Part = (String, BTreeMap<String, String>, Vec<u8>);

/// The parts of a bundle's payload, the first apart; `None` unless it is exactly a
/// well-formed bundle of at least one part (a bad bundle is then delivered whole, and parked
/// as poison).
pub(crate) fn unbundle(payload: &[u8]) -> Option<(Part, Vec<Part>)> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn count(&mut self) -> Option<usize> {
            let (head, rest) = self.0.split_at_checked(4)?;
            self.0 = rest;
            usize::try_from(u32::from_be_bytes(head.try_into().ok()?)).ok()
        }
        fn bytes(&mut self) -> Option<&'a [u8]> {
            let n = self.count()?;
            let (b, rest) = self.0.split_at_checked(n)?;
            self.0 = rest;
            Some(b)
        }
        fn text(&mut self) -> Option<String> {
            String::from_utf8(self.bytes()?.to_vec()).ok()
        }
    }
    fn part(r: &mut Reader<'_>) -> Option<Part> {
        let id = r.text()?;
        let mut headers = BTreeMap::new();
        for _ in 0..r.count()? {
            let name = r.text()?;
            headers.insert(name, r.text()?);
        }
        Some((id, headers, r.bytes()?.to_vec()))
    }
    let mut r = Reader(payload);
    let n = r.count()?;
    if n == 0 {
        return None;
    }
    let first = part(&mut r)?;
    // Every part takes at least 12 bytes: a count larger than that allows is a lie.
    let mut rest = Vec::with_capacity(n.saturating_sub(1).min(payload.len() / 12));
    for _ in 1..n {
        rest.push(part(&mut r)?);
    }
    r.0.is_empty().then_some((first, rest))
}

/// The parts of a message that is a bundle this build reads, by its headers and payload;
/// `None` for any other message.
pub(crate) fn bundle_parts(
    headers: &BTreeMap<String, String>,
    payload: &[u8],
) -> Option<(Part, Vec<Part>)> {
    match headers.get(BUNDLE_HEADER) {
        Some(format) if format == BUNDLE_FORMAT => unbundle(payload),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker refused message {0}")]
    Nacked(String),
    #[error("queue {0} is full; publish again later")]
    Full(String),
    /// The broker refuses publishes for now (`connection.blocked`: a memory or disk alarm).
    #[error("the broker blocks publishing: {0}")]
    Blocked(String),
    /// A message no queue took (its queue was deleted): it came back instead of being lost.
    #[error("a message for queue {queue} came back unroutable ({reason})")]
    Returned { queue: String, reason: String },
}

impl BusError {
    /// Whether the broker refused the publish (a full queue) rather than being unreachable.
    pub fn is_refused(&self) -> bool {
        matches!(self, BusError::Nacked(_) | BusError::Full(_))
    }
}

/// The kind of RabbitMQ queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// One node's.
    #[default]
    Classic,
    /// Replicated across a cluster's nodes (Raft); survives the loss of a minority.
    Quorum,
}

/// Where a RabbitMQ connection's I/O loop (lapin's) runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AmqpIoLoop {
    /// As a task on the process's async runtime: the socket's readiness, the frames and the
    /// tasks they wake stay on the runtime's threads.
    #[default]
    Runtime,
    /// On a thread of its own per connection (lapin's default): every frame in or out is
    /// handed between that thread and the runtime's, a wake-up each.
    Thread,
}

/// How the marketplace uses RabbitMQ: how its queues are declared, where its connections'
/// I/O runs.
#[derive(Debug, Clone, Default)]
pub struct AmqpOptions {
    /// Delete a queue after this long unused (`x-expires`).
    pub expires_ms: Option<u32>,
    pub queue_type: QueueType,
    /// Refuse publishes past this many ready messages (`x-max-length` with
    /// `x-overflow: reject-publish`): back-pressure instead of unbounded queues.
    pub max_length: Option<u32>,
    pub io_loop: AmqpIoLoop,
}

/// One delivered message; must be acked or nacked.
pub struct Incoming {
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub redelivered: bool,
    acker: Settle,
    /// The payload read as an envelope, at its first use: the consumer's span, the handler's
    /// routing and its logic each need it, and parsing is a good part of what a message
    /// costs a service.
    envelope: OnceLock<Result<Box<Envelope>, String>>,
}

/// How a delivery is settled: on its own, or as a part of a bundle.
enum Settle {
    Whole(Acker),
    Part {
        bundle: Arc<Bundle>,
        /// Whether this part was settled already (a second ack must not count twice).
        settled: AtomicBool,
    },
}

/// The delivery of a bundle, settled by its parts.
struct Bundle {
    acker: Acker,
    /// Parts not settled yet; the last one settles the bundle.
    left: AtomicUsize,
    /// Whether a part was given back: the bundle then goes back whole.
    requeue: AtomicBool,
}

/// A settling in progress.
pub type Settling<'a> = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send + 'a>>;

/// How a transport settles one of its deliveries.
pub trait Acknowledge: Send + Sync {
    fn ack(&self) -> Settling<'_>;
    fn nack_requeue(&self) -> Settling<'_>;
}

type Acker = Box<dyn Acknowledge>;

impl Incoming {
    /// A delivery a transport made, settled by `acker`.
    pub(crate) fn new(
        payload: Vec<u8>,
        message_id: Option<String>,
        headers: BTreeMap<String, String>,
        redelivered: bool,
        acker: Box<dyn Acknowledge>,
    ) -> Incoming {
        Incoming {
            payload,
            message_id,
            headers,
            redelivered,
            acker: Settle::Whole(acker),
            envelope: OnceLock::new(),
        }
    }

    /// The envelope the payload carries (decoded once), or why it is not one.
    pub fn envelope(&self) -> Result<&Envelope, &str> {
        self.envelope
            .get_or_init(|| Envelope::from_json(&self.payload).map(Box::new))
            .as_deref()
            .map_err(String::as_str)
    }

    /// A bundle's parts, the first apart, each settled as a part of the bundle; any other
    /// message back as it is, with no others.
    pub(crate) fn split_bundle(self) -> (Incoming, Vec<Incoming>) {
        let msg = self;
        let parts = bundle_parts(&msg.headers, &msg.payload);
        let Some(parts) = parts else {
            return (msg, Vec::new());
        };
        let Settle::Whole(acker) = msg.acker else {
            return (msg, Vec::new());
        };
        let (first, rest) = parts;
        let bundle = Arc::new(Bundle {
            acker,
            left: AtomicUsize::new(1 + rest.len()),
            requeue: AtomicBool::new(false),
        });
        // A part keeps its own headers and takes its bundle's where it has none of that
        // name: a bundle parked whole as a dead letter (by a replica from before bundles)
        // lends each part where it came from and why, so each is a dead letter that can be
        // replayed.
        let outer: Vec<(&String, &String)> = msg
            .headers
            .iter()
            .filter(|(name, _)| name.as_str() != BUNDLE_HEADER)
            .collect();
        let part = |(id, mut headers, payload): Part| {
            for (name, value) in &outer {
                if !headers.contains_key(*name) {
                    headers.insert((*name).clone(), (*value).clone());
                }
            }
            Incoming {
                payload,
                message_id: Some(id),
                headers,
                redelivered: msg.redelivered,
                acker: Settle::Part {
                    bundle: bundle.clone(),
                    settled: AtomicBool::new(false),
                },
                envelope: OnceLock::new(),
            }
        };
        let rest = rest.into_iter().map(part).collect();
        (part(first), rest)
    }

    /// Acks the message. A part of a bundle only counts: the bundle is acked with its last
    /// part (or given back, if another part was).
    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Settle::Whole(acker) => acker.ack().await,
            Settle::Part { bundle, settled } => bundle.settle(settled, false).await,
        }
    }

    /// Gives the message back to the broker (for another try) after `delay`, so a failing
    /// dependency does not turn into a hot redelivery loop. A part of a bundle takes the
    /// whole bundle back with it, once its last part is settled.
    pub async fn nack_requeue(&self, delay: Duration) -> Result<(), BusError> {
        tokio::time::sleep(delay).await;
        match &self.acker {
            Settle::Whole(acker) => acker.nack_requeue().await,
            Settle::Part { bundle, settled } => bundle.settle(settled, true).await,
        }
    }
}

impl Bundle {
    async fn settle(&self, part: &AtomicBool, requeue: bool) -> Result<(), BusError> {
        if part.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if requeue {
            self.requeue.store(true, Ordering::Release);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        if self.requeue.load(Ordering::Acquire) {
            self.acker.nack_requeue().await
        } else {
            self.acker.ack().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(i: u8, headers: usize) -> Outgoing {
        Outgoing {
            queue: "q".into(),
            message_id: format!("m{i}"),
            // Any bytes: NULs, invalid UTF-8, what looks like a length.
            payload: vec![0, i, 0xff, 0xfe, 0, 0, 0, 9],
            headers: (0..headers)
                .map(|h| (format!("h{h}"), format!("v{i}.{h}")))
                .collect(),
        }
    }

    fn all(bundle: &Outgoing) -> Option<Vec<Part>> {
        let (first, mut rest) = unbundle(&bundle.payload)?;
        rest.insert(0, first);
        Some(rest)
    }

    #[test]
    fn a_bundle_gives_back_each_part_as_it_was_sent() {
        let parts = [part(1, 0), part(2, 1), part(3, 3)];
        let bundle = Outgoing::bundle("q", &parts).unwrap();
        assert_eq!(bundle.queue, "q");
        assert_eq!(
            bundle.headers,
            [(BUNDLE_HEADER.to_owned(), BUNDLE_FORMAT.to_owned())]
        );
        let got = all(&bundle).unwrap();
        assert_eq!(got.len(), 3);
        for (sent, (id, headers, payload)) in parts.iter().zip(got) {
            assert_eq!(id, sent.message_id);
            assert_eq!(payload, sent.payload);
            assert_eq!(headers, sent.headers.iter().cloned().collect());
        }
    }

    #[test]
    fn a_bundle_cut_short_or_lengthened_or_lying_is_not_a_bundle() {
        let bundle = Outgoing::bundle("q", &[part(1, 2), part(2, 1)]).unwrap();
        let whole = bundle.payload;
        for len in 0..whole.len() {
            assert!(unbundle(&whole[..len]).is_none(), "cut at {len}");
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert!(unbundle(&longer).is_none());
        // A part count of 3 over two parts, and one of u32::MAX.
        let mut lie = whole.clone();
        lie[3] = 3;
        assert!(unbundle(&lie).is_none());
        lie[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(unbundle(&lie).is_none());
        // No parts at all.
        assert!(unbundle(&0u32.to_be_bytes()).is_none());
        // A message id that is not UTF-8.
        let mut bad_id = whole;
        bad_id[8] = 0xff;
        assert!(unbundle(&bad_id).is_none());
    }
}
