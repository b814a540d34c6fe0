//! RabbitMQ through lapin, the maintained AMQP 0-9-1 client of the ecosystem.
//!
//! Two connections per process, because they fail differently:
//! - the **publishing** connection, with a few channels in confirm mode. RabbitMQ stops
//!   reading from a connection that publishes while a memory or disk alarm is on
//!   (`connection.blocked`): on that connection nothing goes out then, not even an ack. A
//!   publish while it is blocked fails at once with the broker's reason, and the outbox
//!   keeps the rows;
//! - the **consuming** connection, one channel per subscription, which never publishes and
//!   so keeps taking deliveries and sending acks through an alarm.
//!
//! Every publish is `mandatory`: a message no queue takes (its queue was deleted) comes back
//! instead of being confirmed and dropped. A batch with a returned message fails as a whole
//! (the outbox publishes it again; receivers ignore duplicates) and the queues are declared
//! again. Lapin matches a returned message to whichever confirm completes next on its
//! channel, so each channel carries one batch at a time: whatever comes back on it belongs
//! to that batch. Subscribing declares its queue first, so a consumer cancelled by the broker
//! (its queue deleted, a quorum leader moved) comes back on a queue that exists.
//!
//! Lapin's own recovery stays off: it can hang on a connection whose writes stall. A broken
//! connection is dropped and made again on next use, from the next address of the list
//! (`--amqp-url a,b,c`: the nodes of a cluster). Lapin notices a dead peer by its heartbeats
//! — reads, not writes, count — so a broker that freezes without closing the socket is found
//! out within two to two and a half heartbeats even while a publish is stuck in the socket;
//! the heartbeat is 10 s unless the URL says otherwise (`?heartbeat=N`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Semaphore};

use super::message::{
    Acknowledge, AmqpIoLoop, AmqpOptions, BusError, Incoming, Outgoing, QueueType, Settling,
};

/// The longest the broker may take to answer: connect, confirm a batch, open a channel, take
/// an ack. A broker that stops answering without closing the socket (frozen, partitioned)
/// would otherwise hold its caller until the heartbeat check ends the connection: past this,
/// the operation counts as failed (the outbox keeps the rows; an unacked delivery comes again).
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Heartbeat, in seconds, when the URL does not set one: a frozen broker is noticed within
/// 20–25 s.
pub const DEFAULT_HEARTBEAT_S: u16 = 10;

/// Confirm-mode channels on the publishing connection: batches published at once.
const PUBLISH_CHANNELS: usize = 8;

/// `fut`, or `Unavailable` once [`BROKER_TIMEOUT`] has passed.
pub(crate) async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(BROKER_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|e| unavailable(what, &e)),
        Err(_) => Err(BusError::Unavailable(format!(
            "the broker did not answer a {what} within {BROKER_TIMEOUT:?}"
        ))),
    }
}

fn unavailable(what: &str, e: &lapin::Error) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

/// An AMQP name: at most 255 bytes.
fn short(s: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(s)
        .map_err(|_| BusError::Unavailable(format!("name too long for AMQP: {s:?}")))
}

/// The URL with the defaults this client wants when the URL does not say: a heartbeat of
/// [`DEFAULT_HEARTBEAT_S`], and lapin giving up a TCP connect after [`BROKER_TIMEOUT`].
pub fn with_defaults(url: &str) -> String {
    let mut url = url.trim().to_owned();
    let has = |u: &str, key: &str| {
        u.split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.split('=').next() == Some(key)))
    };
    let mut extra = Vec::new();
    if !has(&url, "heartbeat") {
        extra.push(format!("heartbeat={DEFAULT_HEARTBEAT_S}"));
    }
    if !has(&url, "connection_timeout") {
        extra.push(format!("connection_timeout={}", BROKER_TIMEOUT.as_millis()));
    }
    if !extra.is_empty() {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&extra.join("&"));
    }
    url
}

/// The publishing connection and its idle confirm-mode channels.
struct Publisher {
    conn: Arc<Connection>,
    idle: std::sync::Mutex<Vec<Channel>>,
    slots: Arc<Semaphore>,
    /// Why the broker blocked the connection, while it does.
    blocked: Arc<std::sync::Mutex<Option<String>>>,
    /// Ends the task that follows the connection's events.
    _events: tokio_util::sync::DropGuard,
}

impl Publisher {
    fn alive(&self) -> bool {
        self.conn.status().connected()
    }

    /// Why publishing is refused now, if it is.
    fn blocked(&self) -> Option<String> {
        if !self.conn.status().blocked() {
            return None;
        }
        let reason = self
            .blocked
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
            .unwrap_or_else(|| "a resource alarm".into());
        Some(reason)
    }
}

pub struct AmqpBus {
    /// The broker's addresses (a cluster's nodes): a new connection tries them in turn,
    /// starting after the one that failed last.
    urls: Vec<String>,
    next_url: AtomicUsize,
    queues: Vec<String>,
    options: AmqpOptions,
    publisher: Mutex<Option<Arc<Publisher>>>,
    consumer: Mutex<Option<Arc<Connection>>>,
}

impl AmqpBus {
    /// Connects (publishing connection first) and declares the queues.
    pub async fn connect(
        urls: &[String],
        queues: Vec<String>,
        options: AmqpOptions,
    ) -> Result<AmqpBus, BusError> {
        if urls.is_empty() {
            return Err(BusError::Unavailable("no broker address given".into()));
        }
        let bus = AmqpBus {
            urls: urls.iter().map(|u| with_defaults(u)).collect(),
            next_url: AtomicUsize::new(0),
            queues,
            options,
            publisher: Mutex::new(None),
            consumer: Mutex::new(None),
        };
        let publisher = bus.publisher().await?;
        bus.declare_all(&publisher.conn).await?;
        Ok(bus)
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(ms) = self.options.expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        if self.options.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if let Some(max) = self.options.max_length {
            args.insert("x-max-length".into(), AMQPValue::LongUInt(max));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        args
    }

    /// A new connection to the first address of the list that answers, starting after the
    /// last one used.
    async fn open_connection(&self, role: &str) -> Result<Arc<Connection>, BusError> {
        let start = self.next_url.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.urls.len() {
            let index = (start + i) % self.urls.len();
            let url = &self.urls[index];
            let props = ConnectionProperties::default()
                .with_connection_name(format!("ldt {role}").into())
                .with_io_loop_on_runtime(self.options.io_loop == AmqpIoLoop::Runtime);
            match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(url, props)).await {
                Ok(Ok(conn)) => {
                    self.next_url.store(index, Ordering::Relaxed);
                    return Ok(Arc::new(conn));
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", crate::urls::redact(url))),
                Err(_) => errors.push(format!(
                    "{}: no answer within {BROKER_TIMEOUT:?}",
                    crate::urls::redact(url)
                )),
            }
        }
        // The next connection starts with the address after the one tried first.
        self.next_url
            .store((start + 1) % self.urls.len(), Ordering::Relaxed);
        Err(BusError::Unavailable(errors.join("; ")))
    }

    /// The live publishing connection, made again when the old one died.
    async fn publisher(&self) -> Result<Arc<Publisher>, BusError> {
        let mut state = self.publisher.lock().await;
        if let Some(publisher) = state.as_ref()
            && publisher.alive()
        {
            return Ok(publisher.clone());
        }
        if let Some(old) = state.take() {
            close_in_background(old.conn.clone());
        }
        let conn = self.open_connection("publisher").await?;
        let blocked = Arc::new(std::sync::Mutex::new(None));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut events = Box::pin(conn.events_listener());
        let (reason, stopped) = (blocked.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = stopped.cancelled() => return,
                };
                match event {
                    Some(lapin::Event::ConnectionBlocked(why)) => {
                        tracing::warn!(reason = %why, "the broker blocked publishing");
                        if let Ok(mut r) = reason.lock() {
                            *r = Some(why);
                        }
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing");
                        if let Ok(mut r) = reason.lock() {
                            *r = None;
                        }
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        });
        let publisher = Arc::new(Publisher {
            conn,
            idle: std::sync::Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(PUBLISH_CHANNELS)),
            blocked,
            _events: stop.drop_guard(),
        });
        *state = Some(publisher.clone());
        Ok(publisher)
    }

    /// Drops the publishing connection if it is still `publisher` (another task may have made
    /// a new one since).
    async fn forget_publisher(&self, publisher: &Arc<Publisher>) {
        let mut state = self.publisher.lock().await;
        if state.as_ref().is_some_and(|p| Arc::ptr_eq(p, publisher))
            && let Some(old) = state.take()
        {
            close_in_background(old.conn.clone());
        }
    }

    /// The live consuming connection, made again when the old one died.
    async fn consumer(&self) -> Result<Arc<Connection>, BusError> {
        let mut state = self.consumer.lock().await;
        if let Some(conn) = state.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        if let Some(old) = state.take() {
            close_in_background(old);
        }
        let conn = self.open_connection("consumer").await?;
        *state = Some(conn.clone());
        Ok(conn)
    }

    async fn declare(&self, channel: &Channel, queue: &str) -> Result<(), BusError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        within(
            "queue.declare",
            channel.queue_declare(short(queue)?, durable, self.queue_arguments()),
        )
        .await
        .map(|_| ())
    }

    /// Declares every queue of the marketplace (again: a deleted one comes back).
    async fn declare_all(&self, conn: &Connection) -> Result<(), BusError> {
        let channel = within("channel open", conn.create_channel()).await?;
        for queue in &self.queues {
            self.declare(&channel, queue).await?;
        }
        close_channel(channel).await;
        Ok(())
    }

    /// Publishes a batch on one confirm channel and waits for every confirm.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let publisher = self.publisher().await?;
        if let Some(reason) = publisher.blocked() {
            return Err(BusError::Blocked(reason));
        }
        let Ok(_slot) = publisher.slots.clone().acquire_owned().await else {
            return Err(BusError::Unavailable("the publisher is closing".into()));
        };
        let idle = publisher.idle.lock().ok().and_then(|mut idle| idle.pop());
        let channel = match idle {
            Some(channel) if channel.status().connected() => channel,
            _ => match self.confirm_channel(&publisher).await {
                Ok(channel) => channel,
                Err(e) => {
                    self.forget_publisher(&publisher).await;
                    return Err(e);
                }
            },
        };
        // A broker that raises an alarm blocks the connection when it publishes: the batch
        // then waits for nothing, so the wait ends when the broker says so.
        let blocked = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if publisher.blocked().is_some() {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(BROKER_TIMEOUT, publish_on(&channel, batch)) => outcome.ok(),
            () = blocked => None,
        };
        let keep = |channel: Channel| {
            if let Ok(mut idle) = publisher.idle.lock() {
                idle.push(channel);
            }
        };
        match outcome {
            Some(Ok(())) => {
                keep(channel);
                Ok(())
            }
            Some(Err(e @ BusError::Nacked(_))) => {
                // A channel's view of a quorum queue can outlive the queue's leader: after a
                // node is lost, RabbitMQ 3.10 went on refusing every publish on the channels
                // that had published to it, while a new channel's were confirmed. So a refused
                // batch takes its channel with it; the retry gets a fresh one.
                close_in_background_channel(channel);
                Err(e)
            }
            Some(Err(e @ BusError::Returned { .. })) => {
                keep(channel);
                tracing::warn!(error = %e, "a message came back unroutable: declaring the queues again");
                if let Err(d) = self.declare_all(&publisher.conn).await {
                    tracing::warn!(error = %d, "cannot declare the queues again");
                }
                Err(e)
            }
            Some(Err(e)) => {
                if !channel.status().connected() && publisher.alive() {
                    // The broker closed this channel only: the connection goes on.
                    return Err(e);
                }
                self.forget_publisher(&publisher).await;
                Err(e)
            }
            None => {
                // The channel may still hold this batch's frames: never reuse it.
                close_in_background_channel(channel);
                if let Some(reason) = publisher.blocked() {
                    return Err(BusError::Blocked(reason));
                }
                self.forget_publisher(&publisher).await;
                Err(BusError::Unavailable(format!(
                    "the broker did not confirm a publish within {BROKER_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn confirm_channel(&self, publisher: &Publisher) -> Result<Channel, BusError> {
        let channel = within("channel open", publisher.conn.create_channel()).await?;
        within(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(channel)
    }

    /// Starts consuming `queue` on a channel of the consuming connection, declaring the queue
    /// first (it may have been deleted).
    pub async fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer), BusError> {
        let conn = self.consumer().await?;
        let channel = within("channel open", conn.create_channel()).await?;
        self.declare(&channel, queue).await?;
        within(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = within(
            "basic.consume",
            channel.basic_consume(
                short(queue)?,
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok((channel, consumer))
    }

    /// Why publishing would fail now, if it would: no live connection (one is then made in
    /// the background: this never waits for the broker), or a blocked one.
    pub async fn problem(self: &Arc<Self>) -> Option<String> {
        let current = match self.publisher.try_lock() {
            Ok(state) => state.clone(),
            // Someone is connecting right now.
            Err(_) => return Some("connecting to the broker".into()),
        };
        match current {
            Some(p) if p.alive() => p
                .blocked()
                .map(|reason| format!("the broker blocks publishing: {reason}")),
            _ => {
                let bus = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = bus.publisher().await {
                        tracing::debug!(error = %e, "no connection to the broker yet");
                    }
                });
                Some("no connection to the broker".into())
            }
        }
    }

    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BusError> {
        let conn = self.consumer().await?;
        // A channel of its own: a passive declare of a missing queue closes its channel.
        let channel = within("channel open", conn.create_channel()).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = within(
            "queue.declare",
            channel.queue_declare(short(queue)?, passive, FieldTable::default()),
        )
        .await;
        if channel.status().connected() {
            close_channel(channel).await;
        }
        Ok(q?.message_count())
    }

    pub async fn delete_queues(&self, queues: &[String]) -> Result<(), BusError> {
        let conn = self.consumer().await?;
        let channel = within("channel open", conn.create_channel()).await?;
        for q in queues {
            within(
                "queue.delete",
                channel.queue_delete(short(q)?, QueueDeleteOptions::default()),
            )
            .await?;
        }
        close_channel(channel).await;
        Ok(())
    }
}

/// Publishes `batch` (mandatory, persistent) and waits for its confirms: a nack fails it with
/// the message's id, a returned message with the queue and the broker's reason.
async fn publish_on(channel: &Channel, batch: &[Outgoing]) -> Result<(), BusError> {
    let mut confirms = Vec::with_capacity(batch.len());
    for msg in batch {
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(
                short(k)?,
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(short(&msg.message_id)?)
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                short(&msg.queue)?,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.payload,
                props,
            )
            .await
            .map_err(|e| unavailable("publish", &e))?;
        confirms.push(confirm);
    }
    let mut failure = None;
    for (confirm, msg) in confirms.into_iter().zip(batch) {
        let confirmation = confirm
            .await
            .map_err(|e| unavailable("publisher confirm", &e))?;
        match confirmation {
            Confirmation::Ack(None) => {}
            // The return may be matched to any confirm of the batch: it is the batch's.
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                failure = Some(BusError::Returned {
                    queue: returned.delivery.routing_key.to_string(),
                    reason: format!("{} {}", returned.reply_code, returned.reply_text),
                });
            }
            Confirmation::Nack(None) => {
                failure.get_or_insert(BusError::Nacked(msg.message_id.clone()));
            }
            Confirmation::NotRequested => {
                return Err(BusError::Unavailable(
                    "the channel is not in confirm mode".into(),
                ));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The headers of a delivery, as strings.
fn headers_of(props: &BasicProperties) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            headers.insert(k.as_str().to_owned(), text);
        }
    }
    headers
}

/// A delivery from RabbitMQ, as the bus hands it out.
pub(crate) fn incoming(d: lapin::message::Delivery) -> Incoming {
    Incoming::new(
        d.data,
        d.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        headers_of(&d.properties),
        d.redelivered,
        Box::new(Acker(d.acker)),
    )
}

/// Settles one delivery on its channel.
struct Acker(lapin::Acker);

impl Acknowledge for Acker {
    fn ack(&self) -> Settling<'_> {
        Box::pin(
            async move { settled(within("ack", self.0.ack(BasicAckOptions::default())).await?) },
        )
    }

    fn nack_requeue(&self) -> Settling<'_> {
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        Box::pin(async move { settled(within("nack", self.0.nack(options)).await?) })
    }
}

/// Lapin answers `false` when the delivery's channel is gone: the broker gives it again.
fn settled(done: bool) -> Result<(), BusError> {
    if done {
        Ok(())
    } else {
        Err(BusError::Unavailable(
            "the delivery's channel has closed; it will be delivered again".into(),
        ))
    }
}

pub(crate) async fn close_channel(channel: Channel) {
    let _ = tokio::time::timeout(BROKER_TIMEOUT, channel.close(200, "done".into())).await;
}

/// Closes a channel without waiting: closing one whose connection is stuck takes until the
/// timeout.
fn close_in_background_channel(channel: Channel) {
    tokio::spawn(close_channel(channel));
}

fn close_in_background(conn: Arc<Connection>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(BROKER_TIMEOUT, conn.close(200, "reconnecting".into())).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_gets_a_heartbeat_and_a_connect_timeout_unless_it_has_them() {
        assert_eq!(
            with_defaults("amqp://h/%2f"),
            "amqp://h/%2f?heartbeat=10&connection_timeout=10000"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=3"),
            "amqp://h/%2f?heartbeat=3&connection_timeout=10000"
        );
        assert_eq!(
            with_defaults("amqp://h?connection_timeout=5&heartbeat=0"),
            "amqp://h?connection_timeout=5&heartbeat=0"
        );
    }
}
