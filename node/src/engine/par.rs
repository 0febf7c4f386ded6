//! What the compute threads share while they fill one output.

/// An output buffer that the compute threads fill at disjoint places.
pub(super) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: threads only write, through `put`, elements that their callers
// give to exactly one work item (a product's (row, column), an attention
// row), of a buffer borrowed for `'a`; nothing reads it until the pool's
// work is done.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(super) fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Writes `v` at `at..`; each place is written by one work item only.
    pub(super) fn put(&self, at: usize, v: &[f32]) {
        assert!(
            at + v.len() <= self.len,
            "output {at} + {} of {}",
            v.len(),
            self.len
        );
        #[allow(unsafe_code)]
        // SAFETY: in bounds (asserted); no other thread writes these
        // elements (see the `Sync` impl), and nothing reads them until the
        // pool's work is done.
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(at), v.len());
        }
    }
}
