//! A small AMQP 0-9-1 client that runs on the service's own tokio runtime: exactly what the
//! bus needs from RabbitMQ (queues, publisher confirms, consumers with prefetch, acks) and
//! nothing else, on amq-protocol's frame codec.
//!
//! Why not a general client: lapin runs each connection's socket on an I/O thread of its
//! own, so every publish, delivery, confirm and ack crossed threads twice (a futex wake-up
//! each way). At 300 orders/s that thread alone took 8 % of the machine, and on two busy
//! cores every wake-up is a wait in the run queue, on each of an order's six hops. Here a
//! publish or an ack is written to the socket by the task that makes it (several frames in
//! one write), and one reader task per connection hands deliveries and confirms to the
//! tasks waiting for them.
//!
//! A connection carries channel 0 (the connection's own methods) and the channels opened on
//! it; a synchronous method waits for its answer on its channel, one at a time. When the
//! connection ends (the broker closed it, the socket failed, heartbeats stopped) every
//! waiter gets the reason, every consumer's stream ends, and the bus reconnects on its next
//! use.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use amq_protocol::protocol::BasicProperties;

use crate::bus::BusError;

/// The largest frame this client asks for (RabbitMQ's default); bodies are split to fit.
const FRAME_MAX: u32 = 131_072;
/// Heartbeat interval asked for when the URL sets none (the broker may ask for less).
const HEARTBEAT_SECS: u16 = 30;
/// A frame's bytes before its payload (type, channel, size) and after it (frame end).
const FRAME_HEADER: usize = 7;
const FRAME_END: u8 = 0xCE;
const BASIC_CLASS: u16 = 60;

fn unavailable(why: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(why.to_string())
}

/// Where and as whom to connect, from an `amqp://user:pass@host:port/vhost?heartbeat=N` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Address {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub vhost: String,
    pub heartbeat: Option<u16>,
}

impl Address {
    pub fn parse(url: &str) -> Result<Address, BusError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| unavailable(format!("the broker URL is not a URL ({e})")))?;
        match parsed.scheme() {
            "amqp" => {}
            "amqps" => {
                return Err(unavailable(
                    "amqps:// (TLS) is not supported; put a TLS-terminating sidecar or a plain amqp:// listener in front",
                ));
            }
            other => {
                return Err(unavailable(format!(
                    "the broker URL's scheme is `{other}`, expected `amqp`"
                )));
            }
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| unavailable("the broker URL has invalid percent-encoding"))
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let username = match parsed.username() {
            "" => "guest".to_owned(),
            u => decode(u)?,
        };
        let password = match parsed.password() {
            None => "guest".to_owned(),
            Some(p) => decode(p)?,
        };
        // amqp://host and amqp://host/ both mean the default vhost `/`.
        let vhost = match parsed.path().strip_prefix('/').unwrap_or("") {
            "" => "/".to_owned(),
            v => decode(v)?,
        };
        let mut heartbeat = None;
        for (k, v) in parsed.query_pairs() {
            if k == "heartbeat" {
                heartbeat = Some(v.parse::<u16>().map_err(|_| {
                    unavailable(format!("the broker URL's heartbeat `{v}` is not 0–65535"))
                })?);
            }
        }
        Ok(Address {
            host,
            port: parsed.port().unwrap_or(5672),
            username,
            password,
            vhost,
            heartbeat,
        })
    }
}

/// A connection to the broker. Dropping the last handle to it (connection, channels,
/// deliveries' ackers) closes the socket.
#[derive(Clone)]
pub struct Connection {
    keep: Arc<Keep>,
}

/// Keeps a connection's tasks running while anyone holds it.
struct Keep {
    shared: Arc<Shared>,
}

impl Drop for Keep {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        if !shared.connected.load(Ordering::Acquire) {
            return;
        }
        let why = "the connection was dropped".to_owned();
        // Politely where a runtime is left to do it: the broker then requeues at once what
        // was delivered and not acked, instead of when it notices the socket is gone.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let close = AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                            reply_code: 200,
                            reply_text: short("closing"),
                            class_id: 0,
                            method_id: 0,
                        })),
                    );
                    if shared.send(&[close]).await.is_ok() {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, shared.dead.cancelled()).await;
                    }
                    shared.end(why);
                });
            }
            Err(_) => shared.end(why),
        }
    }
}

/// How long a dropped connection waits for the broker's close-ok before it just goes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    /// Frames encoded and not written yet, in the order they go on the wire.
    pending: Mutex<Vec<u8>>,
    /// The socket's sending half, and a spare buffer to swap with `pending`.
    writer: tokio::sync::Mutex<Writer>,
    channels: Mutex<Channels>,
    frame_max: u32,
    channel_max: u16,
    connected: AtomicBool,
    /// Why the connection ended: the first cause, which every later failure reports.
    ended: Mutex<Option<String>>,
    dead: CancellationToken,
    /// When the last bytes came from the broker (ms since `epoch`), for the heartbeat check.
    last_read: AtomicU64,
    epoch: Instant,
}

struct Writer {
    socket: OwnedWriteHalf,
    spare: Vec<u8>,
}

struct Channels {
    open: HashMap<u16, Arc<ChannelState>>,
    next: u16,
}

/// What the reader task needs to know about one open channel.
struct ChannelState {
    id: u16,
    open: AtomicBool,
    /// One synchronous method at a time; its answer goes to `reply`.
    rpc: tokio::sync::Mutex<()>,
    reply: Mutex<Option<oneshot::Sender<Result<AMQPClass, BusError>>>>,
    consumer: Mutex<Option<mpsc::UnboundedSender<Delivery>>>,
    confirms: Mutex<Confirms>,
    /// Why the channel closed.
    closed: Mutex<Option<String>>,
}

#[derive(Default)]
struct Confirms {
    /// In confirm mode: the sequence number the next publish gets (the first is 1).
    next: Option<u64>,
    waiting: BTreeMap<u64, oneshot::Sender<bool>>,
}

impl ChannelState {
    fn new(id: u16) -> ChannelState {
        ChannelState {
            id,
            open: AtomicBool::new(true),
            rpc: tokio::sync::Mutex::new(()),
            reply: Mutex::new(None),
            consumer: Mutex::new(None),
            confirms: Mutex::new(Confirms::default()),
            closed: Mutex::new(None),
        }
    }

    /// Ends the channel: its waiters get `why`, its consumer's stream ends, its unconfirmed
    /// publishes fail.
    fn fail(&self, why: &str) {
        self.open.store(false, Ordering::Release);
        lock(&self.closed).get_or_insert_with(|| why.to_owned());
        if let Some(reply) = lock(&self.reply).take() {
            let _ = reply.send(Err(unavailable(why)));
        }
        lock(&self.consumer).take();
        lock(&self.confirms).waiting.clear();
    }

    fn is_open(&self, shared: &Shared) -> bool {
        self.open.load(Ordering::Acquire) && shared.connected.load(Ordering::Acquire)
    }

    fn why_closed(&self) -> BusError {
        unavailable(
            lock(&self.closed)
                .clone()
                .unwrap_or_else(|| format!("channel {} is closed", self.id)),
        )
    }

    /// Settles the publishes up to `tag` (or only `tag`) as confirmed or refused.
    fn confirm(&self, tag: u64, multiple: bool, ack: bool) {
        let mut confirms = lock(&self.confirms);
        if multiple {
            let rest = confirms.waiting.split_off(&(tag.saturating_add(1)));
            for (_, waiter) in std::mem::replace(&mut confirms.waiting, rest) {
                let _ = waiter.send(ack);
            }
        } else if let Some(waiter) = confirms.waiting.remove(&tag) {
            let _ = waiter.send(ack);
        }
    }
}

/// A std mutex's guard, also after a panic elsewhere poisoned it (the state it guards stays
/// consistent: every critical section here is a plain assignment or map operation).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn end(&self, why: String) {
        if self.connected.swap(false, Ordering::AcqRel) {
            lock(&self.ended).get_or_insert(why);
        }
        self.dead.cancel();
        let why = self.why_ended();
        let channels: Vec<Arc<ChannelState>> =
            lock(&self.channels).open.drain().map(|(_, c)| c).collect();
        for c in channels {
            c.fail(&why);
        }
    }

    fn why_ended(&self) -> String {
        lock(&self.ended)
            .clone()
            .unwrap_or_else(|| "the connection to the broker is closed".to_owned())
    }

    fn channel(&self, id: u16) -> Option<Arc<ChannelState>> {
        lock(&self.channels).open.get(&id).cloned()
    }

    /// Appends frames to what is pending; `encode` runs under the lock, so what it writes
    /// stays in one piece and in order.
    fn queue<T>(
        &self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<T, BusError>,
    ) -> Result<T, BusError> {
        let mut pending = lock(&self.pending);
        if !self.connected.load(Ordering::Acquire) {
            return Err(unavailable(self.why_ended()));
        }
        let mark = pending.len();
        match encode(&mut pending) {
            Ok(t) => Ok(t),
            Err(e) => {
                if pending.len() != mark {
                    // Cut short after a part was encoded (publishes may have taken their
                    // sequence numbers): the connection cannot go on consistently.
                    pending.truncate(mark);
                    drop(pending);
                    self.end(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Writes what is pending, together with whatever other tasks queued meanwhile: first
    /// it lets the tasks that are ready run (a relay about to publish, the other acks of a
    /// batch), so that their frames leave in the same write, one system call for the broker
    /// to read instead of several. Returns once the frames queued before it are written. A
    /// failed write ends the connection (the broker may have seen part of it).
    async fn flush(&self) -> Result<(), BusError> {
        tokio::task::yield_now().await;
        let mut w = self.writer.lock().await;
        let Writer { socket, spare } = &mut *w;
        std::mem::swap(&mut *lock(&self.pending), spare);
        if spare.is_empty() {
            // Another task wrote ours with its own.
            return if self.connected.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(unavailable(self.why_ended()))
            };
        }
        let result = socket.write_all(spare).await;
        spare.clear();
        if let Err(e) = result {
            let why = format!("writing to the broker failed: {e}");
            self.end(why.clone());
            return Err(unavailable(why));
        }
        Ok(())
    }

    async fn send(&self, frames: &[AMQPFrame]) -> Result<(), BusError> {
        self.queue(|buf| {
            for frame in frames {
                encode(buf, frame)?;
            }
            Ok(())
        })?;
        self.flush().await
    }
}

fn encode(buf: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), BusError> {
    let mark = buf.len();
    let encoded = gen_frame(frame)(WriteContext::from(std::mem::take(buf)));
    match encoded {
        Ok(ctx) => {
            *buf = ctx.write;
            Ok(())
        }
        // Never with a growable buffer; and a frame cut short must not reach the wire.
        Err(e) => Err(unavailable(format!(
            "could not encode a frame ({e}); {mark} bytes pending were dropped"
        ))),
    }
}

/// A body frame, written directly: the payload is copied once, into the write buffer.
fn encode_body(buf: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = (frame_max as usize).saturating_sub(FRAME_HEADER + 1).max(1);
    for part in body.chunks(chunk) {
        buf.push(3);
        buf.extend_from_slice(&channel.to_be_bytes());
        buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
        buf.extend_from_slice(part);
        buf.push(FRAME_END);
    }
}

/// The payload size the first frame in `buf` announces, once its header is in.
fn frame_size(buf: &[u8]) -> Option<usize> {
    Some(u32::from_be_bytes(buf.get(3..7)?.try_into().ok()?) as usize)
}

/// The length of the first whole frame in `buf`, if it holds one.
fn whole_frame(buf: &[u8]) -> Option<usize> {
    let len = FRAME_HEADER + frame_size(buf)? + 1;
    (buf.len() >= len).then_some(len)
}

fn parse(bytes: &[u8]) -> Result<AMQPFrame, BusError> {
    match parse_frame(bytes) {
        Ok((_, frame)) => Ok(frame),
        Err(e) => Err(unavailable(format!(
            "the broker sent a frame this client cannot read: {e}"
        ))),
    }
}

/// Reads one frame during the handshake (before the reader task runs).
async fn read_frame(socket: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> Result<AMQPFrame, BusError> {
    loop {
        if buf.starts_with(b"AMQP") && buf.len() >= 8 {
            // The broker's answer to a protocol header it does not take: its own version.
            return Err(unavailable(format!(
                "the broker does not speak AMQP 0-9-1 (it offers {}.{}.{})",
                buf[5], buf[6], buf[7]
            )));
        }
        if let Some(len) = whole_frame(buf) {
            let frame = parse(&buf[..len])?;
            buf.drain(..len);
            return Ok(frame);
        }
        if frame_size(buf).is_some_and(|size| size > FRAME_MAX as usize) {
            return Err(unavailable(
                "the server at the broker's address does not answer in AMQP 0-9-1 frames",
            ));
        }
        buf.reserve(4096);
        match socket.read_buf(buf).await {
            Ok(0) => {
                return Err(unavailable(
                    "the broker closed the connection during the handshake (wrong user or password?)",
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(unavailable(format!("reading from the broker failed: {e}"))),
        }
    }
}

fn connection_closed(close: &connection::Close) -> BusError {
    unavailable(format!(
        "the broker closed the connection: {} {}",
        close.reply_code,
        close.reply_text.as_str()
    ))
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

fn client_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "authentication_failure_close",
    ] {
        capabilities.insert(short(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(
        short("product"),
        AMQPValue::LongString(LongString::from("ldt")),
    );
    props.insert(
        short("version"),
        AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))),
    );
    props.insert(short("capabilities"), AMQPValue::FieldTable(capabilities));
    props
}

impl Connection {
    /// Connects and opens the virtual host.
    pub async fn connect(url: &str) -> Result<Connection, BusError> {
        let addr = Address::parse(url)?;
        let stream = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot connect to the broker at {}:{}: {e}",
                    addr.host, addr.port
                ))
            })?;
        // Small frames (a confirm, an ack) must leave at once, not wait for more to send.
        stream
            .set_nodelay(true)
            .map_err(|e| unavailable(format!("setting TCP_NODELAY failed: {e}")))?;
        let (mut rd, mut wr) = stream.into_split();
        let io = |e: std::io::Error| unavailable(format!("writing to the broker failed: {e}"));
        let mut out = Vec::new();
        encode(
            &mut out,
            &AMQPFrame::ProtocolHeader(amq_protocol::frame::ProtocolVersion::amqp_0_9_1()),
        )?;
        wr.write_all(&out).await.map_err(io)?;
        let mut buf = Vec::with_capacity(8192);

        let start = match read_frame(&mut rd, &mut buf).await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
            other => {
                return Err(unavailable(format!(
                    "the broker did not start an AMQP 0-9-1 connection (sent {other})"
                )));
            }
        };
        let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(unavailable(format!(
                "the broker offers no PLAIN login (offers: {mechanisms})"
            )));
        }
        let response = format!("\0{}\0{}", addr.username, addr.password);
        let start_ok = connection::StartOk {
            client_properties: client_properties(),
            mechanism: short("PLAIN"),
            response: LongString::from(response.as_str()),
            locale: short("en_US"),
        };
        out.clear();
        encode(
            &mut out,
            &AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
            ),
        )?;
        wr.write_all(&out).await.map_err(io)?;

        let tune = match read_frame(&mut rd, &mut buf).await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                return Err(connection_closed(&c));
            }
            other => {
                return Err(unavailable(format!(
                    "unexpected answer to the login: {other}"
                )));
            }
        };
        // Zero from the broker means "no limit": take ours.
        let pick = |theirs: u32, ours: u32| {
            if theirs == 0 { ours } else { theirs.min(ours) }
        };
        let frame_max = pick(tune.frame_max, FRAME_MAX);
        let channel_max = pick(u32::from(tune.channel_max), 2047) as u16;
        let asked = addr.heartbeat.unwrap_or(HEARTBEAT_SECS);
        // Zero turns heartbeats off: ours when we ask for none, else the lower of the two.
        let heartbeat = match (asked, tune.heartbeat) {
            (0, _) => 0,
            (ours, 0) => ours,
            (ours, theirs) => ours.min(theirs),
        };
        out.clear();
        encode(
            &mut out,
            &AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                    channel_max,
                    frame_max,
                    heartbeat,
                })),
            ),
        )?;
        encode(
            &mut out,
            &AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: short(&addr.vhost),
                })),
            ),
        )?;
        wr.write_all(&out).await.map_err(io)?;
        match read_frame(&mut rd, &mut buf).await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                return Err(connection_closed(&c));
            }
            other => {
                return Err(unavailable(format!(
                    "unexpected answer to opening vhost `{}`: {other}",
                    addr.vhost
                )));
            }
        }

        let epoch = Instant::now();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(8192)),
            writer: tokio::sync::Mutex::new(Writer {
                socket: wr,
                spare: Vec::with_capacity(8192),
            }),
            channels: Mutex::new(Channels {
                open: HashMap::from([(0, Arc::new(ChannelState::new(0)))]),
                next: 1,
            }),
            frame_max,
            channel_max,
            connected: AtomicBool::new(true),
            ended: Mutex::new(None),
            dead: CancellationToken::new(),
            last_read: AtomicU64::new(0),
            epoch,
        });
        tokio::spawn(read_loop(rd, buf, shared.clone()));
        if heartbeat > 0 {
            tokio::spawn(heartbeats(
                shared.clone(),
                Duration::from_secs(heartbeat.into()),
            ));
        }
        Ok(Connection {
            keep: Arc::new(Keep { shared }),
        })
    }

    /// Opens a new channel.
    pub async fn open_channel(&self) -> Result<Channel, BusError> {
        let shared = &self.keep.shared;
        let state = {
            let mut channels = lock(&shared.channels);
            if !shared.connected.load(Ordering::Acquire) {
                return Err(unavailable(shared.why_ended()));
            }
            // The next free id, wrapping around: closed channels' ids are used again.
            let mut id = channels.next;
            let mut tried = 0u32;
            while channels.open.contains_key(&id) || id == 0 {
                id = if id >= shared.channel_max { 1 } else { id + 1 };
                tried += 1;
                if tried > u32::from(shared.channel_max) + 1 {
                    return Err(unavailable("every channel of the connection is in use"));
                }
            }
            channels.next = if id >= shared.channel_max { 1 } else { id + 1 };
            let state = Arc::new(ChannelState::new(id));
            channels.open.insert(id, state.clone());
            state
        };
        let channel = Channel {
            keep: self.keep.clone(),
            _closer: Some(Arc::new(Closer {
                shared: shared.clone(),
                state: state.clone(),
            })),
            state,
        };
        match channel
            .rpc(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            )))
            .await?
        {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(channel),
            other => Err(channel.unexpected("channel.open", &other)),
        }
    }

    /// Closes the connection politely: the broker requeues what was delivered and not acked.
    pub async fn close(&self) -> Result<(), BusError> {
        let shared = &self.keep.shared;
        let result = match shared.channel(0) {
            Some(state) => {
                let zero = Channel {
                    keep: self.keep.clone(),
                    state,
                    _closer: None,
                };
                zero.rpc(AMQPClass::Connection(connection::AMQPMethod::Close(
                    connection::Close {
                        reply_code: 200,
                        reply_text: short("closing"),
                        class_id: 0,
                        method_id: 0,
                    },
                )))
                .await
                .map(|_| ())
            }
            None => Ok(()),
        };
        shared.end("the connection was closed".to_owned());
        result
    }
}

/// A channel: where queues are declared, messages published and consumed. It closes when
/// its last clone is dropped (what it delivered and was not acked goes back to its queues).
#[derive(Clone)]
pub struct Channel {
    keep: Arc<Keep>,
    state: Arc<ChannelState>,
    _closer: Option<Arc<Closer>>,
}

/// Closes a channel that was dropped without [`Channel::close`].
struct Closer {
    shared: Arc<Shared>,
    state: Arc<ChannelState>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        if !self.state.is_open(&self.shared) {
            return;
        }
        // Marked closed at once; it leaves the connection's table (and its id may be used
        // again) only when the broker's close-ok comes.
        self.state.fail("the channel was dropped");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let id = self.state.id;
        runtime.spawn(async move {
            let close = AMQPFrame::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 200,
                    reply_text: short("closing"),
                    class_id: 0,
                    method_id: 0,
                })),
            );
            let _ = shared.send(&[close]).await;
        });
    }
}

/// A message delivered to a consumer.
pub struct Delivery {
    pub redelivered: bool,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub acker: Acker,
}

/// Settles one delivery on the channel it came on. It does not keep the connection open:
/// once its subscription and bus are gone, settling fails and the broker delivers again.
pub struct Acker {
    shared: Arc<Shared>,
    state: Arc<ChannelState>,
    tag: u64,
}

/// Deliveries of one consumer, in the order the broker sent them; ends with the channel.
pub struct Consumer {
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl Consumer {
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }
}

/// A publish's answer from the broker: `true` when it took the message.
pub struct Confirm(oneshot::Receiver<bool>, Arc<ChannelState>);

impl Confirm {
    pub async fn wait(self) -> Result<bool, BusError> {
        match self.0.await {
            Ok(ack) => Ok(ack),
            Err(_) => Err(self.1.why_closed()),
        }
    }
}

/// Declaration flags of a queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct Declare {
    pub durable: bool,
    pub passive: bool,
}

impl Channel {
    fn shared(&self) -> &Shared {
        &self.keep.shared
    }

    pub fn is_open(&self) -> bool {
        self.state.is_open(self.shared())
    }

    fn unexpected(&self, what: &str, answer: &AMQPClass) -> BusError {
        unavailable(format!(
            "unexpected answer to {what} on channel {}: {answer:?}",
            self.state.id
        ))
    }

    /// Sends a synchronous method and waits for its answer.
    async fn rpc(&self, method: AMQPClass) -> Result<AMQPClass, BusError> {
        let _one = self.state.rpc.lock().await;
        let (tx, rx) = oneshot::channel();
        *lock(&self.state.reply) = Some(tx);
        // Checked after the reply slot is set: a channel failing meanwhile either found the
        // slot and answered it, or is seen closed here.
        if !self.state.open.load(Ordering::Acquire) {
            lock(&self.state.reply).take();
            return Err(self.state.why_closed());
        }
        self.shared()
            .send(&[AMQPFrame::Method(self.state.id, method)])
            .await?;
        match rx.await {
            Ok(answer) => answer,
            Err(_) => Err(self.state.why_closed()),
        }
    }

    pub async fn queue_declare(
        &self,
        name: &str,
        flags: Declare,
        arguments: FieldTable,
    ) -> Result<queue::DeclareOk, BusError> {
        let method = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: short(name),
            passive: flags.passive,
            durable: flags.durable,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments,
        }));
        match self.rpc(method).await? {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok),
            other => Err(self.unexpected("queue.declare", &other)),
        }
    }

    pub async fn queue_delete(&self, name: &str) -> Result<(), BusError> {
        let method = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: short(name),
            if_unused: false,
            if_empty: false,
            nowait: false,
        }));
        match self.rpc(method).await? {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)) => Ok(()),
            other => Err(self.unexpected("queue.delete", &other)),
        }
    }

    /// Puts the channel in confirm mode: the broker answers every publish.
    pub async fn confirm_select(&self) -> Result<(), BusError> {
        let method = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        }));
        match self.rpc(method).await? {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => {
                lock(&self.state.confirms).next.get_or_insert(1);
                Ok(())
            }
            other => Err(self.unexpected("confirm.select", &other)),
        }
    }

    pub async fn qos(&self, prefetch: u16) -> Result<(), BusError> {
        let method = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        }));
        match self.rpc(method).await? {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
            other => Err(self.unexpected("basic.qos", &other)),
        }
    }

    /// Starts consuming `queue` with explicit acks.
    pub async fn consume(&self, queue: &str) -> Result<Consumer, BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Registered before the request: the first delivery may follow consume-ok at once.
        *lock(&self.state.consumer) = Some(tx);
        let method = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: short(queue),
            consumer_tag: short(""),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        }));
        match self.rpc(method).await {
            Ok(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))) => {
                Ok(Consumer { deliveries: rx })
            }
            Ok(other) => Err(self.unexpected("basic.consume", &other)),
            Err(e) => Err(e),
        }
    }

    /// Publishes messages to queues (through the default exchange) with one write; in
    /// confirm mode, one [`Confirm`] per message, in order.
    pub async fn publish<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a BasicProperties, &'a [u8])>,
    ) -> Result<Vec<Confirm>, BusError> {
        let shared = self.shared();
        let id = self.state.id;
        let confirms = shared.queue(|buf| {
            if !self.state.open.load(Ordering::Acquire) {
                return Err(self.state.why_closed());
            }
            let mut confirms = Vec::new();
            for (routing_key, properties, body) in messages {
                encode(
                    buf,
                    &AMQPFrame::Method(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                            exchange: short(""),
                            routing_key: short(routing_key),
                            mandatory: false,
                            immediate: false,
                        })),
                    ),
                )?;
                encode(
                    buf,
                    &AMQPFrame::Header(
                        id,
                        AMQPContentHeader {
                            class_id: BASIC_CLASS,
                            body_size: body.len() as u64,
                            properties: properties.clone(),
                        },
                    ),
                )?;
                encode_body(buf, id, body, shared.frame_max);
                // The sequence number is the order in which the broker reads the
                // publishes: taken under the lock that orders them on the wire.
                let mut state = lock(&self.state.confirms);
                if let Some(seq) = state.next {
                    let (tx, rx) = oneshot::channel();
                    // A channel that failed meanwhile has cleared its waiters already: this
                    // one's sender is dropped, and its wait fails at once with the reason.
                    if self.state.open.load(Ordering::Acquire) {
                        state.waiting.insert(seq, tx);
                    }
                    state.next = Some(seq + 1);
                    confirms.push(Confirm(rx, self.state.clone()));
                }
            }
            Ok(confirms)
        })?;
        shared.flush().await?;
        Ok(confirms)
    }

    /// Closes the channel; what it delivered and was not acked goes back to its queues.
    pub async fn close(&self) -> Result<(), BusError> {
        let method = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: short("closing"),
            class_id: 0,
            method_id: 0,
        }));
        let result = match self.rpc(method).await {
            Ok(AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => Ok(()),
            Ok(other) => Err(self.unexpected("channel.close", &other)),
            Err(e) => Err(e),
        };
        self.forget("the channel was closed");
        result
    }

    fn forget(&self, why: &str) {
        self.state.fail(why);
        let mut channels = lock(&self.shared().channels);
        if channels
            .open
            .get(&self.state.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.state))
        {
            channels.open.remove(&self.state.id);
        }
    }
}

impl Acker {
    async fn settle(&self, method: basic::AMQPMethod) -> Result<(), BusError> {
        if !self.state.is_open(&self.shared) {
            return Err(self.state.why_closed());
        }
        self.shared
            .send(&[AMQPFrame::Method(self.state.id, AMQPClass::Basic(method))])
            .await
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        self.settle(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: self.tag,
            multiple: false,
        }))
        .await
    }

    pub async fn nack(&self, requeue: bool) -> Result<(), BusError> {
        self.settle(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: self.tag,
            multiple: false,
            requeue,
        }))
        .await
    }
}

/// A delivery whose header and body frames are still to come (`None`: returned content,
/// read and dropped).
struct Partial {
    deliver: Option<basic::Deliver>,
    properties: Option<BasicProperties>,
    size: u64,
    body: Vec<u8>,
}

/// Reads frames until the connection ends and hands each to whoever waits for it.
async fn read_loop(mut socket: OwnedReadHalf, mut buf: Vec<u8>, shared: Arc<Shared>) {
    let why = match read_frames(&mut socket, &mut buf, &shared).await {
        Ok(why) | Err(why) => why,
    };
    shared.end(why);
}

async fn read_frames(
    socket: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    shared: &Arc<Shared>,
) -> Result<String, String> {
    let mut partial: HashMap<u16, Partial> = HashMap::new();
    let limit = shared.frame_max as usize + FRAME_HEADER + 1;
    loop {
        let mut at = 0;
        while let Some(len) = whole_frame(&buf[at..]) {
            let bytes = &buf[at..at + len];
            at += len;
            if bytes[0] == 3 && bytes[len - 1] == FRAME_END {
                // A body frame: appended where it belongs, without a copy of its own.
                let id = u16::from_be_bytes([bytes[1], bytes[2]]);
                body(shared, id, &bytes[FRAME_HEADER..len - 1], &mut partial)?;
                continue;
            }
            let frame = parse(bytes).map_err(|e| e.to_string())?;
            if let Some(why) = dispatch(frame, shared, &mut partial).await? {
                return Ok(why);
            }
        }
        buf.drain(..at);
        if let Some(size) = frame_size(buf)
            && size + FRAME_HEADER + 1 > limit
        {
            return Err(format!(
                "the broker sent a frame of {size} bytes, over the agreed maximum of {}",
                shared.frame_max
            ));
        }
        buf.reserve(32 * 1024);
        let read = tokio::select! {
            read = socket.read_buf(buf) => read,
            () = shared.dead.cancelled() => return Ok(shared.why_ended()),
        };
        match read {
            Ok(0) => return Err("the broker closed the connection".to_owned()),
            Ok(_) => {
                let ms = shared.epoch.elapsed().as_millis() as u64;
                shared.last_read.store(ms, Ordering::Relaxed);
            }
            Err(e) => return Err(format!("reading from the broker failed: {e}")),
        }
    }
}

/// Handles one frame; `Some(why)` when the connection is over.
async fn dispatch(
    frame: AMQPFrame,
    shared: &Arc<Shared>,
    partial: &mut HashMap<u16, Partial>,
) -> Result<Option<String>, String> {
    match frame {
        AMQPFrame::Heartbeat => {}
        AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver))) => {
            partial.insert(
                id,
                Partial {
                    deliver: Some(deliver),
                    properties: None,
                    size: 0,
                    body: Vec::new(),
                },
            );
        }
        AMQPFrame::Header(id, header) => {
            let Some(p) = partial.get_mut(&id) else {
                return Err(format!(
                    "a content header on channel {id} without a delivery"
                ));
            };
            p.size = header.body_size;
            p.body =
                Vec::with_capacity(usize::try_from(header.body_size).unwrap_or(0).min(1 << 20));
            p.properties = Some(header.properties);
            if p.size == 0 {
                deliver(shared, id, partial);
            }
        }
        AMQPFrame::Body(id, bytes) => body(shared, id, &bytes, partial)?,
        AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
            if let Some(c) = shared.channel(id) {
                c.confirm(a.delivery_tag, a.multiple, true);
            }
        }
        AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
            if let Some(c) = shared.channel(id) {
                c.confirm(n.delivery_tag, n.multiple, false);
            }
        }
        AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Cancel(_))) => {
            // The queue went away: the consumer's stream ends (its owner subscribes again).
            if let Some(c) = shared.channel(id) {
                lock(&c.consumer).take();
            }
        }
        AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Return(_))) => {
            // Publishes are never mandatory, so no return should come; if one does, its
            // content is read and dropped rather than taken for a protocol error.
            partial.insert(
                id,
                Partial {
                    deliver: None,
                    properties: None,
                    size: 0,
                    body: Vec::new(),
                },
            );
        }
        AMQPFrame::Method(id, AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
            let why = format!(
                "the broker closed channel {id}: {} {}",
                close.reply_code,
                close.reply_text.as_str()
            );
            let ok = AMQPFrame::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            );
            if let Some(c) = lock(&shared.channels).open.remove(&id) {
                c.fail(&why);
            }
            partial.remove(&id);
            shared.send(&[ok]).await.map_err(|e| e.to_string())?;
        }
        AMQPFrame::Method(id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok))) => {
            if let Some(c) = shared.channel(id) {
                if let Some(reply) = lock(&c.reply).take() {
                    let _ = reply.send(Ok(AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok))));
                }
                if !c.open.load(Ordering::Acquire) {
                    // A dropped channel: its id is free again now.
                    lock(&shared.channels).open.remove(&id);
                }
            }
        }
        AMQPFrame::Method(id, AMQPClass::Channel(channel::AMQPMethod::Flow(flow))) => {
            let ok = AMQPFrame::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                    active: flow.active,
                })),
            );
            shared.send(&[ok]).await.map_err(|e| e.to_string())?;
        }
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
            let ok = AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            );
            let _ = shared.send(&[ok]).await;
            return Ok(Some(connection_closed(&close).to_string()));
        }
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
            if let Some(c) = shared.channel(0)
                && let Some(reply) = lock(&c.reply).take()
            {
                let _ = reply.send(Ok(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                    connection::CloseOk {},
                ))));
            }
            return Ok(Some("the connection was closed".to_owned()));
        }
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ),
        ) => {}
        AMQPFrame::Method(id, method) => {
            // The answer to a synchronous method.
            let waiter = shared.channel(id).and_then(|c| lock(&c.reply).take());
            match waiter {
                Some(reply) => {
                    let _ = reply.send(Ok(method));
                }
                None => {
                    tracing::warn!(
                        channel = id,
                        ?method,
                        "unexpected method from the broker; ignored"
                    );
                }
            }
        }
        AMQPFrame::ProtocolHeader(_) | AMQPFrame::InvalidHeartbeat(_) => {
            return Err(format!("the broker sent an unexpected frame: {frame}"));
        }
    }
    Ok(None)
}

/// Adds a body frame's bytes to the delivery on its channel.
fn body(
    shared: &Arc<Shared>,
    id: u16,
    bytes: &[u8],
    partial: &mut HashMap<u16, Partial>,
) -> Result<(), String> {
    let Some(p) = partial.get_mut(&id) else {
        return Err(format!("a content body on channel {id} without a delivery"));
    };
    if p.properties.is_none() {
        return Err(format!("a content body on channel {id} before its header"));
    }
    p.body.extend_from_slice(bytes);
    if p.body.len() as u64 >= p.size {
        deliver(shared, id, partial);
    }
    Ok(())
}

/// Hands a completed delivery to its channel's consumer.
fn deliver(shared: &Arc<Shared>, id: u16, partial: &mut HashMap<u16, Partial>) {
    let Some(Partial {
        deliver: Some(deliver),
        properties,
        body,
        ..
    }) = partial.remove(&id)
    else {
        return;
    };
    let Some(state) = shared.channel(id) else {
        return;
    };
    let consumer = lock(&state.consumer).clone();
    let Some(consumer) = consumer else {
        // No consumer (it ended): the delivery stays unacked and goes back to its queue when
        // the channel closes.
        return;
    };
    let _ = consumer.send(Delivery {
        redelivered: deliver.redelivered,
        properties: properties.unwrap_or_default(),
        body,
        acker: Acker {
            shared: shared.clone(),
            state,
            tag: deliver.delivery_tag,
        },
    });
}

/// Sends heartbeats and ends the connection when the broker has gone quiet.
async fn heartbeats(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.dead.cancelled() => return,
        }
        let quiet = shared.epoch.elapsed().saturating_sub(Duration::from_millis(
            shared.last_read.load(Ordering::Relaxed),
        ));
        if quiet > every * 2 {
            shared.end(format!("no heartbeat from the broker for {quiet:?}"));
            return;
        }
        if shared.send(&[AMQPFrame::Heartbeat]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_url_gives_host_port_login_and_vhost() {
        let a = Address::parse("amqp://user:p%40ss@10.0.0.7:5673/%2f?heartbeat=5").unwrap();
        assert_eq!(
            a,
            Address {
                host: "10.0.0.7".into(),
                port: 5673,
                username: "user".into(),
                password: "p@ss".into(),
                vhost: "/".into(),
                heartbeat: Some(5),
            }
        );
        let d = Address::parse("amqp://rabbit").unwrap();
        assert_eq!(
            (
                d.host.as_str(),
                d.port,
                d.username.as_str(),
                d.vhost.as_str()
            ),
            ("rabbit", 5672, "guest", "/")
        );
        assert_eq!(Address::parse("amqp://h/shop").unwrap().vhost, "shop");
    }

    #[test]
    fn a_broker_url_this_client_cannot_use_is_refused_with_the_reason() {
        for (url, why) in [
            ("amqps://h/", "TLS"),
            ("http://h/", "scheme"),
            ("not a url", "not a URL"),
            ("amqp://h/?heartbeat=-1", "heartbeat"),
        ] {
            let err = Address::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn a_body_is_cut_into_frames_that_fit_and_read_back_whole() {
        let body: Vec<u8> = (0..25u8).collect();
        let mut buf = Vec::new();
        encode_body(&mut buf, 3, &body, 18);
        // Frames of at most 18 bytes: 10 of payload each, so 10 + 10 + 5.
        let mut at = 0;
        let mut back = Vec::new();
        while let Some(len) = whole_frame(&buf[at..]) {
            assert!(len <= 18);
            match parse(&buf[at..at + len]).unwrap() {
                AMQPFrame::Body(3, part) => back.extend(part),
                other => panic!("not a body frame on channel 3: {other}"),
            }
            at += len;
        }
        assert_eq!(at, buf.len());
        assert_eq!(back, body);
        assert_eq!(whole_frame(&buf[..buf.len() - 1 - 5 - 8 + 1]), Some(18));
        assert_eq!(
            whole_frame(&buf[..6]),
            None,
            "a header cut short is no frame"
        );
    }

    /// A server on the broker's address that answers `reply` to anything, and keeps the
    /// connection open.
    async fn server_answering(reply: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut hello = [0u8; 8];
                    let _ = socket.read_exact(&mut hello).await;
                    let _ = socket.write_all(reply).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        format!("amqp://127.0.0.1:{port}/")
    }

    #[tokio::test]
    async fn a_server_that_is_not_an_amqp_0_9_1_broker_is_named_as_such_at_once() {
        for (reply, why) in [
            (
                &b"AMQP\x00\x00\x08\x00"[..],
                "does not speak AMQP 0-9-1 (it offers 0.8.0)",
            ),
            (
                &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
                "does not answer in AMQP 0-9-1 frames",
            ),
        ] {
            let url = server_answering(reply).await;
            let err = tokio::time::timeout(Duration::from_secs(5), Connection::connect(&url))
                .await
                .expect("an answer, not a wait")
                .err()
                .expect("no connection");
            assert!(err.to_string().contains(why), "{err}");
        }
    }
}
