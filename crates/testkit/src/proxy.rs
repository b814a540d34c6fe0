//! A TCP proxy that gives the connections through it the faults real networks give: it can
//! stop forwarding in both directions while keeping every socket open (a frozen peer, a
//! partition: writes fill the socket buffers and stall), cut every connection with a reset,
//! add latency with jitter to every chunk (in order), and send new connections to another
//! address (a Service moved to a promoted database). Traffic stays on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Chunks read and not yet written, per direction: past it the reader stops reading, the
/// kernel's buffers fill and the sender's writes stall, as with a peer that stopped reading.
const IN_FLIGHT_CHUNKS: usize = 16;

struct State {
    target: Mutex<SocketAddr>,
    paused: watch::Sender<bool>,
    /// Mean and jitter of the latency added to every chunk.
    latency: Mutex<(Duration, Duration)>,
    /// The task of every connection, so a cut can end them.
    conns: Mutex<Vec<AbortHandle>>,
    accepted: AtomicU64,
    seed: AtomicU64,
}

/// A running proxy; it stops (and cuts its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: AbortHandle,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, _) = watch::channel(false);
        let state = Arc::new(State {
            target: Mutex::new(target),
            paused,
            latency: Mutex::new((Duration::ZERO, Duration::ZERO)),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            seed: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        });
        let accepting = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accepting.accepted.fetch_add(1, Ordering::Relaxed);
                let state = accepting.clone();
                let task = tokio::spawn(async move {
                    let target = *lock(&state.target);
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_r, client_w) = split(client);
                    let (upstream_r, upstream_w) = split(upstream);
                    tokio::join!(
                        pump(state.clone(), client_r, upstream_w),
                        pump(state.clone(), upstream_r, client_w),
                    );
                });
                let mut conns = lock(&accepting.conns);
                conns.retain(|t| !t.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Ok(FaultProxy {
            addr,
            state,
            accept: accept.abort_handle(),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops forwarding, both ways, on every connection (new ones too); sockets stay open.
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }

    /// Resets every connection made so far (both ends see it end at once).
    pub fn cut(&self) {
        for task in lock(&self.state.conns).drain(..) {
            task.abort();
        }
    }

    /// Adds `mean` ± `jitter` of latency to every chunk, in both directions (order kept).
    pub fn set_latency(&self, mean: Duration, jitter: Duration) {
        *lock(&self.state.latency) = (mean, jitter);
    }

    /// New connections go to `target` (those made before keep their peer until cut).
    pub fn retarget(&self, target: SocketAddr) {
        *lock(&self.state.target) = target;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Reader = tokio::net::tcp::OwnedReadHalf;
type Writer = tokio::net::tcp::OwnedWriteHalf;

/// The halves of a stream. With linger 0, when its connection's task is aborted (a cut),
/// dropping them resets the connection instead of closing it politely.
fn split(stream: TcpStream) -> (Reader, Writer) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_zero_linger();
    stream.into_split()
}

/// Forwards one direction: reads chunks and stamps each with when it may go; writes them in
/// order, once due and while not paused. Both in the connection's task, so that a cut ends
/// them with it.
async fn pump(state: Arc<State>, mut from: Reader, mut to: Writer) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let stamping = state.clone();
    // It owns the sender: when it ends, the writer sees the end of the chunks.
    let read = async move {
        let state = stamping;
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (mean, jitter) = *lock(&state.latency);
            let delay = if mean.is_zero() && jitter.is_zero() {
                Duration::ZERO
            } else {
                let r = next_random(&state.seed);
                let span = u64::try_from(jitter.as_micros()).unwrap_or(u64::MAX / 4) * 2 + 1;
                (mean + Duration::from_micros(r % span)).saturating_sub(jitter)
            };
            // Never before the chunk ahead of it: the bytes keep their order.
            let due = (Instant::now() + delay).max(last);
            last = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let mut paused = state.paused.subscribe();
    let write = async {
        while let Some((due, chunk)) = rx.recv().await {
            // Without latency the chunk is due already: no timer.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::pin!(write);
    tokio::select! {
        _ = &mut write => {}
        // The sender finished: what it sent still goes, then the end.
        _ = read => write.await,
    }
}

/// xorshift64: jitter needs no more.
fn next_random(seed: &AtomicU64) -> u64 {
    let mut x = seed.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    seed.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(within, s.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        (&buf == b"ping").then(|| started.elapsed())
    }

    #[tokio::test]
    async fn forwards_pauses_delays_and_cuts() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut s, Duration::from_secs(2)).await.is_some());
        proxy.pause();
        assert!(
            round_trip(&mut s, Duration::from_millis(300))
                .await
                .is_none(),
            "nothing comes back while paused"
        );
        proxy.resume();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping", "what waited goes on after the pause");
        proxy.set_latency(Duration::from_millis(50), Duration::from_millis(20));
        let rtt = round_trip(&mut s, Duration::from_secs(2)).await.unwrap();
        assert!(
            rtt >= Duration::from_millis(60),
            "two hops of ≥ 30 ms: {rtt:?}"
        );
        proxy.set_latency(Duration::ZERO, Duration::ZERO);
        proxy.cut();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest))
            .await
            .expect("the cut ends the connection at once");
        assert!(end.is_err() || rest.is_empty());
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            round_trip(&mut again, Duration::from_secs(2))
                .await
                .is_some()
        );
        assert_eq!(proxy.accepted(), 2);
    }
}
