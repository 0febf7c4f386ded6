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

/// The chunks of a history that hold rows `from..to`, each cut to them,
/// as the steps that first carried them: replaying these steps computes
/// exactly what the hop computed (a batch of rows and single rows take
/// different kernels, which differ in rounding).
pub(crate) fn chunks(h: &[(u32, TensorFrame)], from: u32, to: u32) -> Vec<(u32, TensorFrame)> {
    let mut out = Vec::new();
    for (start, frame) in h {
        let n = frame.shape().first().copied().unwrap_or(0) as u32;
        let (a, b) = (from.max(*start), to.min(start + n));
        if a >= b {
            continue;
        }
        if let Some(part) = frame.narrow_rows((a - start) as usize, (b - a) as usize) {
            out.push((a, part));
        }
    }
    out
}

/// Rows `from..to` of a history as one frame, its chunks' bytes joined
/// (rows of the blockwise wire dtypes are whole blocks, so this is exact);
/// `None` when the history does not hold them all.
pub(crate) fn rows(h: &[(u32, TensorFrame)], from: u32, to: u32) -> Option<TensorFrame> {
    if from >= to {
        return None;
    }
    let mut data = Vec::new();
    let mut at = from;
    let mut kind = None;
    for (start, frame) in h {
        let n = frame.shape().first().copied().unwrap_or(0) as u32;
        let (a, b) = (at.max(*start), to.min(start + n));
        if a != at || a >= b {
            continue;
        }
        let part = frame.narrow_rows((a - start) as usize, (b - a) as usize)?;
        let (dtype, width) = (part.dtype(), part.shape().get(1).copied().unwrap_or(0));
        if *kind.get_or_insert((dtype, width)) != (dtype, width) {
            return None;
        }
        data.extend_from_slice(part.data());
        at = b;
        if at == to {
            break;
        }
    }
    let (dtype, width) = kind?;
    (at == to)
        .then(|| TensorFrame::new(dtype, vec![(to - from) as usize, width], data).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_protocol::DType;

    fn frame(values: &[f32]) -> TensorFrame {
        TensorFrame::from_f32(vec![values.len() / 2, 2], values, DType::F32).unwrap()
    }

    #[test]
    fn rows_join_chunks_and_refuse_gaps() {
        let h = vec![
            (0, frame(&[0., 0., 1., 1., 2., 2.])),
            (3, frame(&[3., 3.])),
            (4, frame(&[4., 4., 5., 5.])),
        ];
        let r = rows(&h, 1, 5).unwrap();
        assert_eq!(r.shape(), [4, 2]);
        assert_eq!(r.to_f32(), [1., 1., 2., 2., 3., 3., 4., 4.]);
        assert!(rows(&h, 0, 7).is_none());
        assert!(rows(&h, 2, 2).is_none());
        assert_eq!(history_end(&h), 6);
        let mut cut = h.clone();
        truncate_history(&mut cut, 5);
        assert_eq!(history_end(&cut), 5);
        let c = chunks(&h, 1, 5);
        let starts: Vec<u32> = c.iter().map(|(s, _)| *s).collect();
        assert_eq!(starts, [1, 3, 4]);
        assert_eq!(c[0].1.to_f32(), [1., 1., 2., 2.]);
        assert_eq!(c[2].1.shape(), [1, 2]);
    }
}
