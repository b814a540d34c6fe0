//! How fast the machine is right now, measured in a second or so before a benchmark run, so
//! that a report says what machine state its figures come from.
//!
//! On the virtual machines the benchmarks run on, the same build's saga latency at a fixed
//! rate swings by a factor of five between runs minutes apart, with the speed of the vCPUs
//! and the cost of waking a thread. Two figures capture both:
//! - `compute_ms`: a fixed amount of integer work on one thread (lower is faster);
//! - `wake_us`: the median round trip of a message between two threads that sleep while
//!   they wait for it (two wake-ups; lower is faster). Every hop of a saga is a chain of
//!   such wake-ups, across processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The machine's speed at one moment.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MachineProbe {
    /// Milliseconds for [`COMPUTE_ROUNDS`] rounds of integer work: the fastest of three.
    pub compute_ms: f64,
    /// Median thread-to-thread round trip, in microseconds.
    pub wake_us: f64,
}

/// Rounds of the compute figure: about 50 ms on a 2.5 GHz core.
pub const COMPUTE_ROUNDS: u64 = 20_000_000;

/// Round trips of the wake-up figure.
const ROUND_TRIPS: usize = 2_000;

/// Measures the machine (blocking: about a quarter to half a second).
pub fn measure() -> MachineProbe {
    // The fastest of three: what the core can do, not what a neighbour took from it in one
    // of them.
    let compute = (0..3).map(|_| compute()).min().unwrap_or_default();
    MachineProbe {
        compute_ms: round(compute.as_secs_f64() * 1000.0),
        wake_us: round(wake_round_trip().as_secs_f64() * 1e6),
    }
}

/// Measures the machine on a blocking thread (from async code).
pub async fn measure_async() -> anyhow::Result<MachineProbe> {
    Ok(tokio::task::spawn_blocking(measure).await?)
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Time for a fixed amount of work no compiler can skip (a xorshift chain).
fn compute() -> Duration {
    let started = Instant::now();
    let mut x: u64 = std::hint::black_box(0x9E37_79B9_7F4A_7C15);
    for _ in 0..std::hint::black_box(COMPUTE_ROUNDS) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    started.elapsed()
}

/// Median round trip of a message to a thread that sleeps until it comes, and back. Each side
/// parks (a futex wait, no spinning), so each trip is two real wake-ups.
fn wake_round_trip() -> Duration {
    // Odd: the echo thread's turn; even: the caller's. `u64::MAX` stops the echo.
    let turn = Arc::new(AtomicU64::new(0));
    let caller = std::thread::current();
    let echo = {
        let turn = turn.clone();
        std::thread::spawn(move || {
            loop {
                let t = turn.load(Ordering::Acquire);
                if t == u64::MAX {
                    return;
                }
                if t % 2 == 1 {
                    turn.store(t + 1, Ordering::Release);
                    caller.unpark();
                } else {
                    std::thread::park();
                }
            }
        })
    };
    let mut trips = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS as u64 {
        let sent = Instant::now();
        turn.store(2 * i + 1, Ordering::Release);
        echo.thread().unpark();
        let deadline = sent + Duration::from_secs(1);
        while turn.load(Ordering::Acquire) != 2 * i + 2 {
            // Bounded: a lost wake-up costs a trip, never the benchmark.
            std::thread::park_timeout(Duration::from_millis(10));
            if Instant::now() > deadline {
                break;
            }
        }
        trips.push(sent.elapsed());
    }
    turn.store(u64::MAX, Ordering::Release);
    echo.thread().unpark();
    let _ = echo.join();
    trips.sort_unstable();
    trips.get(trips.len() / 2).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_measures_work_and_wake_ups() {
        let probe = measure();
        // Work that takes no time or more than ten seconds was not measured.
        assert!(
            probe.compute_ms > 1.0 && probe.compute_ms < 10_000.0,
            "{probe:?}"
        );
        // A round trip is two wake-ups: more than nothing, less than a second.
        assert!(
            probe.wake_us > 0.0 && probe.wake_us < 1_000_000.0,
            "{probe:?}"
        );
    }
}
