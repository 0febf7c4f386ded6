//! Server-sent events from a job's events, shared by both API dialects.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::JobEvent;

/// Streams a job as server-sent events: `first`, then the events `render`
/// makes of each job event, until `render` says an event was the last
/// (or the job's channel closes).
pub(super) fn event_stream<R>(
    rx: mpsc::Receiver<JobEvent>,
    first: Vec<Event>,
    render: R,
) -> Response
where
    R: FnMut(JobEvent) -> (Vec<Event>, bool) + Send + 'static,
{
    struct St<R> {
        rx: mpsc::Receiver<JobEvent>,
        queue: VecDeque<Event>,
        done: bool,
        render: R,
    }
    let st = St {
        rx,
        queue: first.into(),
        done: false,
        render,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let ev = st.rx.recv().await?;
            let (events, last) = (st.render)(ev);
            st.queue.extend(events);
            st.done = last;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
