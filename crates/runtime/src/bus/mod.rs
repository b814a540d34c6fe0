//! The message transport the services talk over.
//!
//! [`Bus`] is what the services see: publish a batch (returns once the broker confirmed every
//! message), subscribe to a queue (at-least-once deliveries, explicit ack / nack). It is an
//! enum rather than a trait object: RabbitMQ (through lapin, in [`rabbitmq`]) for real
//! deployments, and the in-process [`embedded`] bus for `ldt up` without a broker. The
//! services cannot tell them apart; `tests/transport.rs` runs one conformance suite against
//! both. What crosses either is in [`message`].
//!
//! Connections are re-established lazily: a publish or subscribe after the broker restarted
//! reconnects, and the callers (the outbox relay and the consumer loops) retry with backoff.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::StreamExt;

pub mod embedded;
pub mod message;
pub mod rabbitmq;

pub use embedded::EmbeddedBus;
use embedded::EmbeddedSubscription;
pub use message::{AmqpIoLoop, AmqpOptions, BUNDLE_HEADER, BusError, Incoming, Outgoing};
use rabbitmq::AmqpBus;

#[derive(Clone)]
pub enum Bus {
    Amqp(Arc<AmqpBus>),
    Embedded(EmbeddedBus),
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
            AmqpOptions {
                expires_ms: queue_expires_ms,
                ..AmqpOptions::default()
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

    /// Like [`amqp`](Bus::amqp), declaring the queues with `options`. `url` may list several
    /// addresses of one cluster, separated by commas.
    pub async fn amqp_with(
        url: &str,
        queues: Vec<String>,
        options: AmqpOptions,
    ) -> Result<Bus, BusError> {
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Bus::Amqp(Arc::new(
            AmqpBus::connect(&urls, queues, options).await?,
        )))
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
            Bus::Amqp(b) => {
                let (channel, consumer) = b.subscribe(queue, prefetch).await?;
                Ok(Subscription::new(Source::Amqp {
                    channel,
                    consumer: Box::new(consumer),
                }))
            }
            Bus::Embedded(b) => Ok(Subscription::new(Source::Embedded(
                b.subscribe(queue, prefetch),
            ))),
        }
    }

    /// Whether the broker takes messages now (for `/readyz`).
    pub async fn ping(&self) -> bool {
        self.problem().await.is_none()
    }

    /// Why the bus would not take a message now, if it would not: the broker unreachable, or
    /// blocking publishes (for `/readyz`).
    pub async fn problem(&self) -> Option<String> {
        match self {
            Bus::Amqp(b) => b.problem().await,
            Bus::Embedded(b) => (!b.healthy()).then(|| "the in-process bus has stopped".into()),
        }
    }

    /// How many messages wait in `queue` (ready, not yet delivered).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BusError> {
        match self {
            Bus::Amqp(b) => b.queue_depth(queue).await,
            Bus::Embedded(b) => Ok(b.queue_depth(queue)),
        }
    }

    /// Waits until what this process has settled is durable with the bus: the embedded
    /// bus's acks are journaled in the background (RabbitMQ takes them as they come).
    pub async fn flush(&self) {
        if let Bus::Embedded(b) = self {
            b.flush().await;
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

/// A stream of deliveries from one queue. A bundle ([`Outgoing::bundle`]) comes out as its
/// parts, one delivery each.
pub struct Subscription {
    source: Source,
    /// The parts of the last bundle not handed out yet.
    parts: VecDeque<Incoming>,
}

enum Source {
    Amqp {
        channel: lapin::Channel,
        consumer: Box<lapin::Consumer>,
    },
    Embedded(EmbeddedSubscription),
}

impl Subscription {
    fn new(source: Source) -> Subscription {
        Subscription {
            source,
            parts: VecDeque::new(),
        }
    }

    /// The next delivery; `None` when the subscription ended (broker gone, channel closed).
    pub async fn next(&mut self) -> Option<Result<Incoming, BusError>> {
        if let Some(part) = self.parts.pop_front() {
            return Some(Ok(part));
        }
        let next = match &mut self.source {
            Source::Amqp { consumer, .. } => match consumer.next().await? {
                Ok(delivery) => Ok(rabbitmq::incoming(delivery)),
                Err(e) => Err(BusError::Unavailable(format!("delivery: {e}"))),
            },
            Source::Embedded(s) => s.next().await?,
        };
        Some(next.map(|msg| {
            let (first, rest) = msg.split_bundle();
            self.parts.extend(rest);
            first
        }))
    }

    /// Stops the subscription; unacknowledged deliveries go back to the queue.
    pub async fn close(self) {
        match self.source {
            Source::Amqp { channel, .. } => rabbitmq::close_channel(channel).await,
            Source::Embedded(s) => s.close(),
        }
    }
}
