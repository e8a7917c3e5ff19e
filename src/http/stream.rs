//! Server-sent events for streaming responses: `data: {chunk}` frames, an optional usage
//! chunk, then `data: [DONE]`. An error after the headers went out becomes one
//! `data: {"error": …}` frame followed by `[DONE]`. The stream owns the [`Generation`]: when the
//! client disconnects, hyper drops the stream and every choice is aborted.

use super::generation::{total_usage, ChoiceEvent, Generation};
use super::response::UsageOut;
use crate::engine::Usage;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

/// Keep-alive comments keep proxies from closing a stream that waits in the queue, and let a
/// vanished client be noticed while nothing else is written.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How one endpoint renders its chunks.
pub trait ChunkFormat: Send + 'static {
    /// Frames sent before any engine event (e.g. the chat role delta).
    fn prelude(&mut self, choices: usize) -> Vec<Event>;
    fn on(&mut self, ev: ChoiceEvent) -> Vec<Event>;
    /// The final usage chunk, when the request asked for one.
    fn usage(&mut self, usage: UsageOut) -> Option<Event>;
}

struct StreamState<F> {
    gen: Generation,
    fmt: F,
    queue: VecDeque<Event>,
    usages: Vec<Usage>,
    open: usize,
    n: usize,
    finished: bool,
}

pub fn sse_response<F: ChunkFormat>(gen: Generation, n: usize, mut fmt: F) -> Response {
    let choices = gen.choices;
    let st = StreamState {
        queue: fmt.prelude(choices).into(),
        gen,
        fmt,
        usages: vec![Usage::default(); choices],
        open: choices,
        n,
        finished: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<Event, Infallible>(e), st));
            }
            if st.finished {
                return None;
            }
            if st.open == 0 {
                if let Some(u) = st.fmt.usage(total_usage(&st.usages, st.n)) {
                    st.queue.push_back(u);
                }
                st.queue.push_back(Event::default().data("[DONE]"));
                st.finished = true;
                continue;
            }
            match st.gen.events.recv().await {
                None => st.fail(super::error::ApiError::Internal),
                Some(ChoiceEvent::Failed { error, .. }) => st.fail(error),
                Some(ev) => {
                    if let ChoiceEvent::Done { index, usage, .. } = &ev {
                        st.usages[*index] = *usage;
                        st.open -= 1;
                    }
                    let frames = st.fmt.on(ev);
                    st.queue.extend(frames);
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

impl<F> StreamState<F> {
    fn fail(&mut self, error: super::error::ApiError) {
        self.queue
            .push_back(Event::default().data(error.body().to_string()));
        self.queue.push_back(Event::default().data("[DONE]"));
        self.finished = true;
    }
}
