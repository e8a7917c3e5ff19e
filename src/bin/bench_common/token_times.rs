//! What the engine benchmarks (`bench_engine`, `gpu_check`'s engine rows) share: when each
//! submitted stream's tokens arrived, and the steady decode rate those times give.

use kvserve::engine::{EngineEvent, Submission};
use std::time::Instant;

/// Each stream's token arrival times, in submission order: one thread per stream drains its
/// events until the stream ends, so no stream waits on another's reader.
pub fn token_times(subs: Vec<Submission>) -> Vec<Vec<Instant>> {
    let joins: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while let Some(ev) = s.events.blocking_recv() {
                    if let EngineEvent::Token(_) = ev {
                        times.push(Instant::now());
                    }
                }
                times
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

/// Output tokens/s once every stream has its first token (prefill over): the tokens that
/// arrived after the last first token, over the time from it to the last token. `t0` stands
/// in for streams without tokens.
pub fn steady_decode_rate(all: &[Vec<Instant>], t0: Instant) -> f64 {
    let decoding = all.iter().filter_map(|t| t.first()).max().copied();
    let end = all.iter().filter_map(|t| t.last()).max().copied();
    let (decoding, end) = (decoding.unwrap_or(t0), end.unwrap_or(t0));
    let after: usize = all
        .iter()
        .map(|t| t.iter().filter(|&&x| x > decoding).count())
        .sum();
    after as f64 / (end - decoding).as_secs_f64().max(1e-9)
}
