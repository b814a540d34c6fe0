//! The transport conformance suite: the contract the services rely on, checked against
//! every transport — RabbitMQ (the real broker), the in-process bus with its journal (the
//! embedded mode) and the in-process bus in memory (`--ephemeral`).
//!
//! At-least-once delivery, explicit ack and nack with requeue, per-queue FIFO, prefetch,
//! dead-lettering of poison messages, back-pressure from a bounded queue, bundles (several
//! messages in one, taken apart on delivery and settled as one), and (for the durable
//! transports) messages that outlive the process that published them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldt_contract::Queues;
use ldt_runtime::bus::{AmqpIoLoop, AmqpOptions, Bus, Incoming, Outgoing, Subscription};
use ldt_runtime::consumer::{
    Consumer, Delivery, HandleError, Handler, ORIGIN_QUEUE_HEADER, REASON_HEADER,
};
use ldt_runtime::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Amqp,
    Journaled,
    Memory,
}

/// How the tests declare their RabbitMQ queues: gone ten minutes after a test left them.
fn amqp_options() -> AmqpOptions {
    AmqpOptions {
        expires_ms: Some(600_000),
        ..AmqpOptions::default()
    }
}

/// One transport in a fresh namespace (its own queues, its own journal file).
struct Fixture {
    kind: Kind,
    queues: Queues,
    dir: PathBuf,
}

impl Fixture {
    fn new(kind: Kind) -> Fixture {
        let ns = format!("t_{}", uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(format!("ldt-transport-{ns}"));
        Fixture {
            kind,
            queues: Queues::new(&ns),
            dir,
        }
    }

    fn names(&self) -> Vec<String> {
        self.queues.all()
    }

    fn queue(&self) -> String {
        self.names()[0].clone()
    }

    /// Opens the transport; `capacity` bounds each queue's ready messages.
    async fn open(&self, capacity: Option<usize>) -> Bus {
        match self.kind {
            Kind::Amqp => Bus::amqp_with(
                &common::amqp_url(),
                self.names(),
                AmqpOptions {
                    max_length: capacity.map(|c| c as u32),
                    ..amqp_options()
                },
            )
            .await
            .unwrap(),
            Kind::Journaled => Bus::embedded(
                Some(&self.dir.join("bus.db")),
                self.names(),
                capacity.unwrap_or(ldt_runtime::bus::embedded::DEFAULT_CAPACITY),
            )
            .await
            .unwrap(),
            Kind::Memory => Bus::embedded(
                None,
                self.names(),
                capacity.unwrap_or(ldt_runtime::bus::embedded::DEFAULT_CAPACITY),
            )
            .await
            .unwrap(),
        }
    }

    fn message(&self, queue: &str, i: usize) -> Outgoing {
        Outgoing {
            queue: queue.to_owned(),
            message_id: format!("m{i}"),
            payload: format!("payload {i}").into_bytes(),
            headers: vec![("x-test".into(), format!("h{i}"))],
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.kind == Kind::Amqp {
            let names = self.names();
            common::clean_up(async move {
                if let Ok(bus) = Bus::amqp(&common::amqp_url(), Vec::new(), None).await {
                    let _ = bus.delete_queues(&names).await;
                }
            });
        }
    }
}

async fn next(sub: &mut Subscription) -> Incoming {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open")
        .expect("a delivery, not an error")
}

fn text(m: &Incoming) -> String {
    String::from_utf8(m.payload.clone()).unwrap()
}

/// Takes the next deliveries, expecting the messages numbered `expected` in that order, and
/// acks each.
async fn ack_in_order(sub: &mut Subscription, expected: impl IntoIterator<Item = usize>) {
    for i in expected {
        let m = next(sub).await;
        assert_eq!(text(&m), format!("payload {i}"));
        m.ack().await.unwrap();
    }
}

async fn round_trip_keeps_id_headers_and_payload(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    bus.publish(&[f.message(&q, 7)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 7");
    assert_eq!(m.message_id.as_deref(), Some("m7"));
    assert_eq!(m.headers.get("x-test").map(String::as_str), Some("h7"));
    assert!(!m.redelivered);
    m.ack().await.unwrap();
}

async fn each_queue_is_first_in_first_out(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    for chunk in (0..200).collect::<Vec<_>>().chunks(20) {
        let batch: Vec<Outgoing> = chunk.iter().map(|i| f.message(&q, *i)).collect();
        bus.publish(&batch).await.unwrap();
    }
    let mut sub = bus.subscribe(&q, 50).await.unwrap();
    ack_in_order(&mut sub, 0..200).await;
}

async fn a_nacked_message_is_delivered_again_and_an_acked_one_is_not(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    bus.publish(&[f.message(&q, 1)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut sub).await;
    m.nack_requeue(Duration::ZERO).await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(text(&again), "payload 1");
    assert!(again.redelivered);
    again.ack().await.unwrap();
    // The next delivery is the next message, not the acked one once more.
    bus.publish(&[f.message(&q, 2)]).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 2");
    m.ack().await.unwrap();
}

async fn unacked_messages_go_back_when_a_subscription_ends(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let batch: Vec<Outgoing> = (0..3).map(|i| f.message(&q, i)).collect();
    bus.publish(&batch).await.unwrap();
    let mut first = bus.subscribe(&q, 10).await.unwrap();
    let held: Vec<Incoming> = vec![
        next(&mut first).await,
        next(&mut first).await,
        next(&mut first).await,
    ];
    first.close().await;
    drop(held);
    let mut second = bus.subscribe(&q, 10).await.unwrap();
    for i in 0..3 {
        let m = next(&mut second).await;
        assert_eq!(text(&m), format!("payload {i}"));
        assert!(m.redelivered);
        m.ack().await.unwrap();
    }
}

async fn prefetch_bounds_the_unacked_deliveries(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let batch: Vec<Outgoing> = (0..10).map(|i| f.message(&q, i)).collect();
    bus.publish(&batch).await.unwrap();
    let mut sub = bus.subscribe(&q, 3).await.unwrap();
    let held = [
        next(&mut sub).await,
        next(&mut sub).await,
        next(&mut sub).await,
    ];
    // Three unacked: a fourth must not come (the wait can only fail on a broken bus).
    common::nothing_comes(&mut sub, "a fourth delivery arrived with prefetch 3").await;
    held[0].ack().await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 3");
}

/// Parks messages whose payload says so, records the others, and the batches they came in.
struct Picky {
    handled: Mutex<Vec<String>>,
    batches: Mutex<Vec<Vec<String>>>,
}

impl Handler for Picky {
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        self.batches
            .lock()
            .unwrap()
            .push(batch.iter().map(|d| text(&d.msg)).collect());
        let mut outcomes = Vec::with_capacity(batch.len());
        for d in batch {
            outcomes.push(self.handle(&d.msg).await);
        }
        outcomes
    }

    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let body = String::from_utf8_lossy(&msg.payload).into_owned();
        if body.starts_with("poison") {
            return Err(HandleError::Poison(format!("cannot read {body:?}")));
        }
        self.handled.lock().unwrap().push(body);
        Ok(())
    }
}

/// The consumer loop on the fixture's first queue, with a [`Picky`] handler.
struct PickyConsumer {
    handler: Arc<Picky>,
    metrics: Metrics,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PickyConsumer {
    fn start(f: &Fixture, bus: &Bus, batches_in_flight: usize) -> PickyConsumer {
        PickyConsumer::start_with(f, bus, batches_in_flight, Duration::ZERO)
    }

    fn start_with(
        f: &Fixture,
        bus: &Bus,
        batches_in_flight: usize,
        linger: Duration,
    ) -> PickyConsumer {
        let handler = Arc::new(Picky {
            handled: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
        });
        let shutdown = CancellationToken::new();
        let metrics = Metrics::default();
        let task = tokio::spawn(ldt_runtime::consumer::consume(
            Consumer {
                bus: bus.clone(),
                queues: f.queues.clone(),
                queue: f.queue(),
                service: "test",
                prefetch: 8,
                batches_in_flight,
                linger,
                max_attempts: 10,
                attempts: Default::default(),
                metrics: metrics.clone(),
            },
            handler.clone(),
            shutdown.clone(),
        ));
        PickyConsumer {
            handler,
            metrics,
            shutdown,
            task,
        }
    }

    /// What was handled, once `n` messages were (within 10 s).
    async fn handled(&self, n: usize) -> Vec<String> {
        let started = std::time::Instant::now();
        while self.handler.handled.lock().unwrap().len() < n {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "only {:?} handled",
                self.handler.handled.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.handler.handled.lock().unwrap().clone()
    }

    /// Stops the loop once its in-flight batches are settled.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// With `--linger-ms`, a small batch on a busy queue waits for more deliveries to join it
/// (one transaction instead of several); the first delivery after a lull never waits.
async fn a_busy_queue_lingers_for_fuller_batches_an_idle_one_does_not(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    // Busy: deliveries less than a second apart (twice the linger).
    let consumer = PickyConsumer::start_with(&f, &bus, 1, Duration::from_millis(500));
    // The sleeps shape the arrivals (100 ms apart, then a lull of 1.5 s), well inside and
    // well outside the linger.
    let publish_spaced = |numbers: &'static [usize]| {
        let (bus, f, q) = (&bus, &f, &q);
        async move {
            for (k, &i) in numbers.iter().enumerate() {
                if k > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bus.publish(&[f.message(q, i)]).await.unwrap();
            }
        }
    };
    // 1 comes to an idle queue: handled at once, so 2 (100 ms later) is not in its batch;
    // 2 comes 100 ms after it: the queue is busy, and 3 joins 2's batch.
    publish_spaced(&[1, 2, 3]).await;
    consumer.handled(3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // After the lull 4 is handled at once; 5, 100 ms later, waits in vain for company.
    publish_spaced(&[4, 5]).await;
    consumer.handled(5).await;
    let batches = consumer.handler.batches.lock().unwrap().clone();
    assert_eq!(
        batches,
        [
            vec!["payload 1"],
            vec!["payload 2", "payload 3"],
            vec!["payload 4"],
            vec!["payload 5"]
        ]
    );
    // What an operator sees of it: four batches for five messages.
    let metrics = consumer.metrics.render();
    let batches = common::counter(
        &metrics,
        "ldt_consumer_batches_total",
        &format!("queue=\"{q}\""),
    );
    assert_eq!(batches, 4.0, "{metrics}");
    consumer.stop().await;
}

async fn poison_is_parked_on_the_dead_letter_queue_and_the_rest_flows(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let dlq = f.queues.dead_letters();
    let consumer = PickyConsumer::start(&f, &bus, 2);
    let mut poison = f.message(&q, 1);
    poison.payload = b"poison pill".to_vec();
    bus.publish(&[poison, f.message(&q, 2)]).await.unwrap();
    let mut dead = bus.subscribe(&dlq, 10).await.unwrap();
    let parked = next(&mut dead).await;
    assert_eq!(text(&parked), "poison pill");
    assert_eq!(parked.message_id.as_deref(), Some("m1"));
    assert_eq!(parked.headers.get(ORIGIN_QUEUE_HEADER), Some(&q));
    assert!(parked.headers[REASON_HEADER].contains("cannot read"));
    assert_eq!(parked.headers.get("x-test").map(String::as_str), Some("h1"));
    parked.ack().await.unwrap();
    assert_eq!(consumer.handled(1).await, vec!["payload 2".to_owned()]);
    consumer.stop().await;
}

async fn a_full_queue_refuses_publishes_until_it_drains(f: Fixture) {
    let bus = f.open(Some(5)).await;
    let q = f.queue();
    for i in 0..5 {
        bus.publish(&[f.message(&q, i)]).await.unwrap();
    }
    let refused = bus.publish(&[f.message(&q, 5)]).await.unwrap_err();
    assert!(refused.is_refused(), "{refused}");
    let mut sub = bus.subscribe(&q, 1).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 0");
    m.ack().await.unwrap();
    bus.publish(&[f.message(&q, 6)]).await.unwrap();
    ack_in_order(&mut sub, [1, 2, 3, 4, 6]).await;
}

async fn published_messages_outlive_the_publisher(f: Fixture) {
    let q = f.queue();
    {
        let bus = f.open(None).await;
        let batch: Vec<Outgoing> = (0..3).map(|i| f.message(&q, i)).collect();
        bus.publish(&batch).await.unwrap();
        // Take one and stop without acking it: it must come back too.
        let mut sub = bus.subscribe(&q, 1).await.unwrap();
        let unacked = next(&mut sub).await;
        sub.close().await;
        drop(unacked);
    }
    let bus = f.open(None).await;
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    ack_in_order(&mut sub, 0..3).await;
}

/// Hundreds of messages published at once (the journal writes them many to a statement)
/// and half of them acked: across a restart exactly the unacked half comes back, in order,
/// ahead of what was published after the acks.
async fn a_large_batch_outlives_the_publisher_less_what_was_acked(f: Fixture) {
    const N: usize = 250;
    let q = f.queue();
    {
        let bus = f.open(None).await;
        let batch: Vec<Outgoing> = (0..N).map(|i| f.message(&q, i)).collect();
        bus.publish(&batch).await.unwrap();
        let mut sub = bus.subscribe(&q, N as u16).await.unwrap();
        let mut held = Vec::new();
        for i in 0..N {
            let m = next(&mut sub).await;
            assert_eq!(text(&m), format!("payload {i}"));
            if i % 2 == 0 {
                m.ack().await.unwrap();
            } else {
                held.push(m);
            }
        }
        // Published after the acks: once it is in, so are they.
        bus.publish(&[f.message(&q, N)]).await.unwrap();
        sub.close().await;
        drop(held);
    }
    let bus = f.open(None).await;
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    ack_in_order(&mut sub, (1..N).step_by(2).chain([N])).await;
}

/// Acks are durable once the bus is flushed, as a service flushes it when it stops: after a
/// restart none of the acked messages comes back ahead of a new one. The first life runs on
/// a runtime of its own that is dropped when it ends, as a process ends: whatever the bus
/// still meant to do in the background is lost with it.
async fn acks_are_kept_across_a_restart_once_flushed(f: Fixture) {
    let q = f.queue();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(async {
                    let bus = f.open(None).await;
                    let batch: Vec<Outgoing> = (0..3).map(|i| f.message(&q, i)).collect();
                    bus.publish(&batch).await.unwrap();
                    let mut sub = bus.subscribe(&q, 10).await.unwrap();
                    for _ in 0..3 {
                        next(&mut sub).await.ack().await.unwrap();
                    }
                    sub.close().await;
                    bus.flush().await;
                });
            })
            .join()
            .unwrap();
    });
    let bus = f.open(None).await;
    bus.publish(&[f.message(&q, 9)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 9", "an acked message came back");
    m.ack().await.unwrap();
}

/// Three parts in one bus message ([`Outgoing::bundle`]), then a message on its own.
fn bundle_and_one_more(f: &Fixture, q: &str) -> Vec<Outgoing> {
    let parts: Vec<Outgoing> = (1..=3).map(|i| f.message(q, i)).collect();
    vec![Outgoing::bundle(q, &parts).unwrap(), f.message(q, 4)]
}

async fn a_bundle_arrives_as_its_parts_and_goes_back_whole_if_one_part_does(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    bus.publish(&bundle_and_one_more(&f, &q)).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let mut got = Vec::new();
    for i in 1..=4 {
        let m = next(&mut sub).await;
        assert_eq!(text(&m), format!("payload {i}"));
        assert_eq!(m.message_id, Some(format!("m{i}")));
        assert_eq!(m.headers.get("x-test"), Some(&format!("h{i}")));
        assert!(!m.redelivered);
        got.push(m);
    }
    // The lone message and two parts acked, one part given back: the bundle comes back
    // whole, the lone message does not.
    got[3].ack().await.unwrap();
    got[0].ack().await.unwrap();
    got[1].nack_requeue(Duration::ZERO).await.unwrap();
    got[2].ack().await.unwrap();
    for i in 1..=3 {
        let m = next(&mut sub).await;
        assert_eq!(text(&m), format!("payload {i}"));
        assert!(m.redelivered);
        m.ack().await.unwrap();
    }
    // Everything acked: what comes next is what is published next.
    bus.publish(&[f.message(&q, 5)]).await.unwrap();
    assert_eq!(text(&next(&mut sub).await), "payload 5");
}

async fn a_bundle_is_acked_only_with_its_last_part(f: Fixture) {
    let q = f.queue();
    {
        let bus = f.open(None).await;
        bus.publish(&bundle_and_one_more(&f, &q)).await.unwrap();
        let mut sub = bus.subscribe(&q, 10).await.unwrap();
        // Two of the three parts and the lone message acked; the third part never is.
        for i in 1..=4 {
            let m = next(&mut sub).await;
            if i != 3 {
                m.ack().await.unwrap();
            }
        }
        // Published after the acks: once it is in, so are they.
        bus.publish(&[f.message(&q, 5)]).await.unwrap();
        sub.close().await;
    }
    let bus = f.open(None).await;
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    ack_in_order(&mut sub, [1, 2, 3, 5]).await;
}

async fn a_poison_part_is_parked_alone_and_its_bundle_acked(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let dlq = f.queues.dead_letters();
    let consumer = PickyConsumer::start(&f, &bus, 1);
    let mut parts: Vec<Outgoing> = (1..=3).map(|i| f.message(&q, i)).collect();
    parts[1].payload = b"poison pill".to_vec();
    bus.publish(&[Outgoing::bundle(&q, &parts).unwrap()])
        .await
        .unwrap();
    let mut dead = bus.subscribe(&dlq, 10).await.unwrap();
    let parked = next(&mut dead).await;
    assert_eq!(text(&parked), "poison pill");
    assert_eq!(parked.message_id.as_deref(), Some("m2"));
    assert_eq!(parked.headers.get(ORIGIN_QUEUE_HEADER), Some(&q));
    assert_eq!(parked.headers.get("x-test").map(String::as_str), Some("h2"));
    assert!(!parked.headers.contains_key(ldt_runtime::bus::BUNDLE_HEADER));
    parked.ack().await.unwrap();
    assert_eq!(
        consumer.handled(2).await,
        vec!["payload 1".to_owned(), "payload 3".to_owned()]
    );
    // The bundle was acked: stopping the consumer gives nothing back to the queue.
    consumer.stop().await;
    bus.publish(&[f.message(&q, 4)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    assert_eq!(text(&next(&mut sub).await), "payload 4");
}

async fn a_malformed_bundle_is_delivered_whole(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let mut bad = f.message(&q, 1);
    bad.headers
        .push((ldt_runtime::bus::BUNDLE_HEADER.to_owned(), "1".to_owned()));
    bus.publish(&[bad]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(text(&m), "payload 1");
    assert_eq!(m.message_id.as_deref(), Some("m1"));
    m.ack().await.unwrap();
    bus.publish(&[f.message(&q, 2)]).await.unwrap();
    assert_eq!(text(&next(&mut sub).await), "payload 2");
}

async fn a_dropped_subscription_gives_back_its_unacked_messages(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let batch: Vec<Outgoing> = (0..3).map(|i| f.message(&q, i)).collect();
    bus.publish(&batch).await.unwrap();
    let mut first = bus.subscribe(&q, 10).await.unwrap();
    let held = [next(&mut first).await, next(&mut first).await];
    // Neither closed nor acked: a consumer loop that ended by an error drops its
    // subscription, and what it held must not stay stuck with it.
    drop(first);
    drop(held);
    let mut second = bus.subscribe(&q, 10).await.unwrap();
    ack_in_order(&mut second, 0..3).await;
}

async fn a_message_larger_than_a_frame_arrives_whole(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    // RabbitMQ's frames carry at most 128 KiB: this body takes three, cut mid-pattern.
    let payload: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    let big = Outgoing {
        payload: payload.clone(),
        ..f.message(&q, 1)
    };
    bus.publish(&[big, f.message(&q, 2)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.payload.len(), payload.len());
    assert!(m.payload == payload, "the large body came back changed");
    assert_eq!(m.message_id.as_deref(), Some("m1"));
    m.ack().await.unwrap();
    ack_in_order(&mut sub, [2]).await;
}

async fn a_missing_queue_has_no_depth_and_the_bus_goes_on(f: Fixture) {
    let bus = f.open(None).await;
    let q = f.queue();
    let missing = format!("{q}-missing");
    let err = bus.queue_depth(&missing).await.unwrap_err();
    assert!(
        err.to_string().contains("NOT_FOUND"),
        "the broker's reason is kept: {err}"
    );
    bus.publish(&[f.message(&q, 1)]).await.unwrap();
    assert_eq!(bus.queue_depth(&q).await.unwrap(), 1);
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    ack_in_order(&mut sub, [1]).await;
}

/// The parts of the test broker's URL.
struct Broker {
    host: String,
    port: u16,
    username: String,
    password: String,
    vhost: String,
}

impl Broker {
    fn parse(url: &str) -> Broker {
        let u = url::Url::parse(url).unwrap();
        let vhost = percent_encoding::percent_decode_str(u.path().trim_start_matches('/'))
            .decode_utf8_lossy()
            .into_owned();
        Broker {
            host: u.host_str().unwrap().to_owned(),
            port: u.port().unwrap_or(5672),
            username: u.username().to_owned(),
            password: u.password().unwrap_or("").to_owned(),
            vhost: if vhost.is_empty() { "/".into() } else { vhost },
        }
    }
}

/// A TCP relay to the broker whose connections the test can cut, as a network failure or
/// a broker that died would.
struct Relay {
    url: String,
    pipes: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start() -> Relay {
        let broker = Broker::parse(&common::amqp_url());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pipes: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let target = (broker.host.clone(), broker.port);
        let held = pipes.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                held.lock().unwrap().push(pipe.abort_handle());
            }
        });
        let vhost = if broker.vhost == "/" {
            "%2f".to_owned()
        } else {
            broker.vhost.clone()
        };
        Relay {
            url: format!(
                "amqp://{}:{}@127.0.0.1:{port}/{vhost}",
                broker.username, broker.password
            ),
            pipes,
        }
    }

    /// Cuts every connection made so far (both ends see the socket close).
    fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

/// When the connection to the broker is cut, consumers see their subscription end, nothing
/// waits forever, and the bus connects again on its next use; what was delivered and not
/// acked before the cut is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_cut_connection_ends_subscriptions_and_the_bus_reconnects() {
    let f = Fixture::new(Kind::Amqp);
    let relay = Relay::start().await;
    let bus = Bus::amqp_with(&relay.url, f.names(), AmqpOptions::default())
        .await
        .unwrap();
    let q = f.queue();
    bus.publish(&[f.message(&q, 1)]).await.unwrap();
    let mut sub = bus.subscribe(&q, 10).await.unwrap();
    let held = next(&mut sub).await;
    relay.cut();
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the subscription ends within 10 s of the cut");
    assert!(
        !matches!(ended, Some(Ok(_))),
        "no delivery after the cut, the subscription ends"
    );
    assert!(
        held.ack().await.is_err(),
        "an ack on the cut connection fails"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = bus.publish(&[f.message(&q, 2)]).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the bus did not reconnect within 10 s: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = bus.subscribe(&q, 10).await.unwrap();
    let m = next(&mut again).await;
    assert_eq!(text(&m), "payload 1");
    assert!(m.redelivered);
    m.ack().await.unwrap();
    ack_in_order(&mut again, [2]).await;
}

/// Where lapin's I/O runs is what `--amqp-io-loop` says: with `runtime` on the process's
/// async runtime, no thread of its own (none in `top -H`); with `thread` a thread per
/// connection. The bus publishes and delivers either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_the_io_loop_runs_on_the_runtime_or_on_threads_of_its_own() {
    // The other tests of this binary leave the I/O loop on the runtime, so every thread
    // counted here is this test's.
    fn io_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "lapin-io-loop")
            .count()
    }
    for io_loop in [AmqpIoLoop::Runtime, AmqpIoLoop::Thread] {
        let f = Fixture::new(Kind::Amqp);
        let options = AmqpOptions {
            io_loop,
            ..amqp_options()
        };
        let bus = Bus::amqp_with(&common::amqp_url(), f.names(), options)
            .await
            .unwrap();
        let q = f.queue();
        bus.publish(&[f.message(&q, 1)]).await.unwrap();
        let mut sub = bus.subscribe(&q, 10).await.unwrap();
        ack_in_order(&mut sub, [1]).await;
        let threads = io_threads();
        match io_loop {
            AmqpIoLoop::Runtime => assert_eq!(threads, 0, "no I/O thread on the runtime"),
            AmqpIoLoop::Thread => assert!(
                threads >= 2,
                "a thread for the publishing and one for the consuming connection, found {threads}"
            ),
        }
    }
}

/// A login or virtual host the broker refuses is an error that says why, at once.
#[tokio::test]
async fn amqp_a_refused_login_or_vhost_is_reported_with_the_broker_s_reason() {
    let broker = Broker::parse(&common::amqp_url());
    let base = format!("127.0.0.1:{}", broker.port);
    for (url, why) in [
        (
            format!("amqp://{}:not-the-password@{base}/%2f", broker.username),
            "ACCESS_REFUSED",
        ),
        (
            format!(
                "amqp://{}:{}@{base}/no-such-vhost-{}",
                broker.username,
                broker.password,
                uuid::Uuid::new_v4().simple()
            ),
            "NOT_ALLOWED",
        ),
    ] {
        let err = tokio::time::timeout(Duration::from_secs(10), Bus::amqp(&url, Vec::new(), None))
            .await
            .expect("an answer within 10 s")
            .err()
            .expect("refused");
        assert!(err.to_string().contains(why), "{url}: {err}");
    }
}

/// Queues declared again with other arguments than they have: the broker refuses, and the
/// error says so instead of a bare "channel closed".
#[tokio::test]
async fn amqp_a_queue_declared_with_other_arguments_is_refused_with_the_reason() {
    let f = Fixture::new(Kind::Amqp);
    let _first = f.open(None).await;
    let err = Bus::amqp_with(
        &common::amqp_url(),
        f.names(),
        AmqpOptions {
            max_length: Some(5),
            ..amqp_options()
        },
    )
    .await
    .err()
    .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("x-max-length"),
        "{text}"
    );
}

/// Runs each named scenario against each transport kind.
macro_rules! conformance {
    ($($scenario:ident: [$($kind:ident),*];)*) => {
        $(
            mod $scenario {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    #[allow(non_snake_case)]
                    async fn $kind() {
                        super::$scenario(super::Fixture::new(super::Kind::$kind)).await;
                    }
                )*
            }
        )*
    };
}

conformance! {
    round_trip_keeps_id_headers_and_payload: [Amqp, Journaled, Memory];
    each_queue_is_first_in_first_out: [Amqp, Journaled, Memory];
    a_nacked_message_is_delivered_again_and_an_acked_one_is_not: [Amqp, Journaled, Memory];
    unacked_messages_go_back_when_a_subscription_ends: [Amqp, Journaled, Memory];
    prefetch_bounds_the_unacked_deliveries: [Amqp, Journaled, Memory];
    poison_is_parked_on_the_dead_letter_queue_and_the_rest_flows: [Amqp, Journaled, Memory];
    a_busy_queue_lingers_for_fuller_batches_an_idle_one_does_not: [Amqp, Journaled, Memory];
    a_full_queue_refuses_publishes_until_it_drains: [Amqp, Journaled, Memory];
    // In memory, nothing outlives the process: that is what `--ephemeral` means.
    published_messages_outlive_the_publisher: [Amqp, Journaled];
    a_large_batch_outlives_the_publisher_less_what_was_acked: [Amqp, Journaled];
    acks_are_kept_across_a_restart_once_flushed: [Amqp, Journaled];
    a_bundle_arrives_as_its_parts_and_goes_back_whole_if_one_part_does: [Amqp, Journaled, Memory];
    a_bundle_is_acked_only_with_its_last_part: [Amqp, Journaled];
    a_poison_part_is_parked_alone_and_its_bundle_acked: [Amqp, Journaled, Memory];
    a_malformed_bundle_is_delivered_whole: [Amqp, Journaled, Memory];
    a_dropped_subscription_gives_back_its_unacked_messages: [Amqp, Journaled, Memory];
    a_message_larger_than_a_frame_arrives_whole: [Amqp, Journaled, Memory];
    // The in-process bus knows every queue it was opened with and no other.
    a_missing_queue_has_no_depth_and_the_bus_goes_on: [Amqp];
}
