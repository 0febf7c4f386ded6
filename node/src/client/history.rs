//! Each hop's input history: contiguous positions from 0, as the frames
//! were first sent; what failover replays.

use nomoat_protocol::TensorFrame;

/// Drops positions `pos..` from a hop's history, cutting a chunk that
/// straddles `pos`.
pub(super) fn truncate_history(h: &mut Vec<(u32, TensorFrame)>, pos: u32) {
    while let Some((start, frame)) = h.last() {
        let rows = frame.shape().first().copied().unwrap_or(0) as u32;
        if start + rows <= pos {
            break;
        }
        if *start >= pos {
            h.pop();
            continue;
        }
        let keep = (pos - start) as usize;
        match frame.narrow_rows(0, keep) {
            Some(f) => {
                let start = *start;
                *h.last_mut().expect("not empty") = (start, f);
            }
            None => {
                h.pop();
            }
        }
        break;
    }
}

/// The next position after a hop's history.
pub(super) fn history_end(h: &[(u32, TensorFrame)]) -> u32 {
    h.last().map_or(0, |(s, f)| {
        s + f.shape().first().copied().unwrap_or(0) as u32
    })
}
