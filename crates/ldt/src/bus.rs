//! The message transport the services talk over.
//!
//! [`Bus`] is what the services see: publish a batch (returns once the broker confirmed every
//! message), subscribe to a queue (at-least-once deliveries, explicit ack / nack). It is an
//! enum rather than a trait object so that no future is boxed: RabbitMQ (lapin) for real
//! deployments, and the in-process [`EmbeddedBus`] for `ldt up` without a broker. The
//! services cannot tell them apart; `tests/transport.rs` runs one conformance suite
//! against both.
//!
//! Connections are re-established lazily: a publish or subscribe after the broker restarted
//! reconnects, and the callers (the outbox relay and the consumer loops) retry with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

pub use crate::embedded_bus::EmbeddedBus;
use crate::embedded_bus::{EmbeddedAcker, EmbeddedSubscription};

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub queue: String,
    pub message_id: String,
    pub payload: Vec<u8>,
    /// String headers (trace context, dead-letter metadata).
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker refused message {0}")]
    Nacked(String),
    #[error("queue {0} is full; publish again later")]
    Full(String),
}

impl BusError {
    /// Whether the broker refused the publish (a full queue) rather than being unreachable.
    pub fn is_refused(&self) -> bool {
        matches!(self, BusError::Nacked(_) | BusError::Full(_))
    }
}

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError::Unavailable(e.to_string())
    }
}

/// The longest the broker may take to confirm a publish, take an ack or close a connection.
/// When a connection dies, lapin may never settle what was in flight on it: past this, the
/// operation counts as failed (the outbox keeps the rows; an unacked delivery is redelivered)
/// instead of holding up its caller for good.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or `Unavailable` once [`BROKER_TIMEOUT`] has passed.
async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(BROKER_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(BusError::Unavailable(format!(
            "the broker did not answer a {what} within {BROKER_TIMEOUT:?}"
        ))),
    }
}

#[derive(Clone)]
pub enum Bus {
    Amqp(Arc<AmqpBus>),
    Embedded(EmbeddedBus),
}

/// How the marketplace's queues are declared on RabbitMQ.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// Delete a queue after this long unused (`x-expires`).
    pub expires_ms: Option<u32>,
    /// `classic` (default) or `quorum`.
    pub queue_type: Option<String>,
    /// Refuse publishes past this many ready messages (`x-max-length` with
    /// `x-overflow: reject-publish`): back-pressure instead of unbounded queues.
    pub max_length: Option<u32>,
}

impl Bus {
    /// Connects to RabbitMQ and declares the given queues.
    pub async fn amqp(
        url: &str,
        queues: Vec<String>,
        queue_expires_ms: Option<u32>,
    ) -> Result<Bus, BusError> {
        Bus::amqp_with(
            url,
            queues,
            QueueOptions {
                expires_ms: queue_expires_ms,
                ..QueueOptions::default()
            },
        )
        .await
    }

    /// The in-process bus, journaled in `journal` (or in memory only when `None`).
    pub async fn embedded(
        journal: Option<&std::path::Path>,
        queues: Vec<String>,
        capacity: usize,
    ) -> Result<Bus, BusError> {
        Ok(Bus::Embedded(
            EmbeddedBus::open(journal, queues, capacity).await?,
        ))
    }

    /// Like [`amqp`](Bus::amqp), declaring the queues with `options`.
    pub async fn amqp_with(
        url: &str,
        queues: Vec<String>,
        options: QueueOptions,
    ) -> Result<Bus, BusError> {
        let bus = AmqpBus {
            url: url.to_owned(),
            queues,
            options,
            state: Mutex::new(None),
        };
        bus.publisher().await?;
        Ok(Bus::Amqp(Arc::new(bus)))
    }

    /// The `messaging.system` of spans: `rabbitmq`, or `ldt_embedded` for the in-process bus.
    pub fn system(&self) -> &'static str {
        match self {
            Bus::Amqp(_) => "rabbitmq",
            Bus::Embedded(_) => "ldt_embedded",
        }
    }

    /// Publishes every message and waits until the broker has confirmed them all.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        match self {
            Bus::Amqp(b) => b.publish(batch).await,
            Bus::Embedded(b) => b.publish(batch).await,
        }
    }

    /// Starts consuming `queue`, at most `prefetch` deliveries unacknowledged at once.
    pub async fn subscribe(&self, queue: &str, prefetch: u16) -> Result<Subscription, BusError> {
        match self {
            Bus::Amqp(b) => b.subscribe(queue, prefetch).await,
            Bus::Embedded(b) => Ok(Subscription::Embedded(b.subscribe(queue, prefetch))),
        }
    }

    /// Whether the broker answers now (for `/readyz`).
    pub async fn ping(&self) -> bool {
        match self {
            Bus::Amqp(b) => b.publisher().await.is_ok(),
            Bus::Embedded(b) => b.healthy(),
        }
    }

    /// How many messages wait in `queue` (ready, not yet delivered).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BusError> {
        match self {
            Bus::Amqp(b) => b.queue_depth(queue).await,
            Bus::Embedded(b) => Ok(b.queue_depth(queue)),
        }
    }

    /// Deletes the queues (test clean-up).
    pub async fn delete_queues(&self, queues: &[String]) -> Result<(), BusError> {
        match self {
            Bus::Amqp(b) => b.delete_queues(queues).await,
            Bus::Embedded(b) => b.delete_queues(queues).await,
        }
    }
}

pub struct AmqpBus {
    url: String,
    queues: Vec<String>,
    options: QueueOptions,
    /// The shared connection and the confirm-mode channel used for publishing.
    state: Mutex<Option<(Arc<Connection>, Channel)>>,
}

impl AmqpBus {
    async fn connect(&self) -> Result<(Arc<Connection>, Channel), BusError> {
        let conn = Arc::new(Connection::connect(&self.url, ConnectionProperties::default()).await?);
        let channel = conn.create_channel().await?;
        let mut args = FieldTable::default();
        if let Some(ms) = self.options.expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        if let Some(queue_type) = self.options.queue_type.as_deref()
            && queue_type != "classic"
        {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(queue_type)),
            );
        }
        if let Some(max) = self.options.max_length {
            args.insert("x-max-length".into(), AMQPValue::LongUInt(max));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        for queue in &self.queues {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    args.clone(),
                )
                .await?;
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((conn, channel))
    }

    /// The live connection and publishing channel, reconnecting when the old one died.
    async fn publisher(&self) -> Result<(Arc<Connection>, Channel), BusError> {
        let mut state = self.state.lock().await;
        if let Some((conn, channel)) = state.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok((conn.clone(), channel.clone()));
        }
        if let Some((conn, _)) = state.take() {
            let _ = within("connection close", conn.close(0, "reconnecting".into())).await;
        }
        let fresh = match tokio::time::timeout(BROKER_TIMEOUT, self.connect()).await {
            Ok(fresh) => fresh?,
            Err(_) => {
                return Err(BusError::Unavailable(format!(
                    "no connection to the broker within {BROKER_TIMEOUT:?}"
                )));
            }
        };
        *state = Some(fresh.clone());
        Ok(fresh)
    }

    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (_, channel) = self.publisher().await?;
        // Pipeline: send the whole batch, then wait for the confirms, never one at a time.
        let mut confirms = Vec::with_capacity(batch.len());
        for msg in batch {
            let mut headers = FieldTable::default();
            for (k, v) in &msg.headers {
                headers.insert(
                    k.as_str().into(),
                    AMQPValue::LongString(LongString::from(v.as_str())),
                );
            }
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(msg.message_id.as_str().into())
                .with_headers(headers);
            let confirm = within(
                "publish",
                channel.basic_publish(
                    "".into(),
                    msg.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &msg.payload,
                    props,
                ),
            )
            .await;
            match confirm {
                Ok(c) => confirms.push((c, &msg.message_id)),
                Err(e) => {
                    self.forget_channel().await;
                    return Err(e);
                }
            }
        }
        for (confirm, id) in confirms {
            match within("publisher confirm", confirm).await {
                Ok(c) if c.is_ack() => {}
                Ok(_) => return Err(BusError::Nacked(id.clone())),
                Err(e) => {
                    self.forget_channel().await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn forget_channel(&self) {
        // Not holding the lock while closing: closing a broken connection may take until the
        // timeout, and every publisher and subscriber needs the lock meanwhile.
        let forgotten = self.state.lock().await.take();
        if let Some((conn, _)) = forgotten {
            let _ = within("connection close", conn.close(0, "publish failed".into())).await;
        }
    }

    async fn subscribe(&self, queue: &str, prefetch: u16) -> Result<Subscription, BusError> {
        let (conn, _) = self.publisher().await?;
        let channel = within("channel open", conn.create_channel()).await?;
        within(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = within(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Subscription::Amqp {
            channel,
            consumer: Box::new(consumer),
        })
    }

    async fn queue_depth(&self, queue: &str) -> Result<u32, BusError> {
        let (conn, _) = self.publisher().await?;
        // A channel of its own: a passive declare of a missing queue closes its channel.
        let channel = conn.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
        Ok(q?.message_count())
    }

    async fn delete_queues(&self, queues: &[String]) -> Result<(), BusError> {
        let (_, channel) = self.publisher().await?;
        for q in queues {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// A stream of deliveries from one queue.
pub enum Subscription {
    Amqp {
        channel: Channel,
        consumer: Box<lapin::Consumer>,
    },
    Embedded(EmbeddedSubscription),
}

impl Subscription {
    /// The next delivery; `None` when the subscription ended (broker gone, channel closed).
    pub async fn next(&mut self) -> Option<Result<Incoming, BusError>> {
        match self {
            Subscription::Amqp { consumer, .. } => match consumer.next().await? {
                Ok(delivery) => Some(Ok(Incoming::from_amqp(delivery))),
                Err(e) => Some(Err(e.into())),
            },
            Subscription::Embedded(s) => s.next().await,
        }
    }

    /// Stops the subscription; unacknowledged deliveries go back to the queue.
    pub async fn close(self) {
        match self {
            Subscription::Amqp { channel, .. } => {
                let _ = within("channel close", channel.close(200, "shutting down".into())).await;
            }
            Subscription::Embedded(s) => s.close(),
        }
    }
}

/// One delivered message; must be acked or nacked.
pub struct Incoming {
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub redelivered: bool,
    acker: Acker,
}

enum Acker {
    Amqp(lapin::Acker),
    Embedded(EmbeddedAcker),
}

impl Incoming {
    pub(crate) fn embedded(
        payload: Vec<u8>,
        message_id: Option<String>,
        headers: BTreeMap<String, String>,
        redelivered: bool,
        acker: EmbeddedAcker,
    ) -> Incoming {
        Incoming {
            payload,
            message_id,
            headers,
            redelivered,
            acker: Acker::Embedded(acker),
        }
    }

    fn from_amqp(d: lapin::message::Delivery) -> Incoming {
        let mut headers = BTreeMap::new();
        if let Some(table) = d.properties.headers() {
            for (k, v) in table.inner() {
                let text = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    other => format!("{other:?}"),
                };
                headers.insert(k.as_str().to_owned(), text);
            }
        }
        Incoming {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            payload: d.data,
            headers,
            redelivered: d.redelivered,
            acker: Acker::Amqp(d.acker),
        }
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Amqp(a) => within("ack", a.ack(BasicAckOptions::default()))
                .await
                .map(|_| ())?,
            Acker::Embedded(a) => a.ack()?,
        }
        Ok(())
    }

    /// Gives the message back to the broker (for another try) after `delay`, so a failing
    /// dependency does not turn into a hot redelivery loop.
    pub async fn nack_requeue(&self, delay: Duration) -> Result<(), BusError> {
        tokio::time::sleep(delay).await;
        match &self.acker {
            Acker::Amqp(a) => within(
                "nack",
                a.nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                }),
            )
            .await
            .map(|_| ())?,
            Acker::Embedded(a) => a.nack_requeue()?,
        }
        Ok(())
    }
}
