//! One process-wide budget for the bytes requests hold in memory (`--max-inflight-bytes`):
//! request bodies and what decoding, preparing, running and answering an image needs, over
//! every task. Per-task admission ([`super::pool`]) bounds how many requests wait; this bounds
//! how much memory they hold, whatever their images' sizes and however many tasks there are.
//!
//! A request reserves its body before reading it (`Content-Length`, or chunk by chunk), then
//! grows the reservation to [`segment_bytes`] — estimated from the image header before
//! anything is decoded ([`crate::data::imgio::header_of_bytes`]) — and holds it until its work
//! is over: a [`Reservation`] gives its bytes back when dropped (answer, error, timeout, a
//! client gone). What does not fit is answered 503 + `Retry-After`; what could never fit, 413.
//! ONNX Runtime's own working memory is not counted (it is bounded by the sessions).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Default `--max-inflight-bytes`: 1 GiB. A fixed value, so a server behaves the same on
/// every machine: room for two of the largest images the default pixel cap admits (40 MP
/// 16-bit RGBA: about 440 MB each by [`segment_bytes`]) or about 35 Kvasir-sized ones
/// (1920×1072 on a 1024-px model: 29 MB), well beyond the default `sessions + queue` of one
/// task; `serve` refuses to start when it does not fit in the memory available beside the
/// models.
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 1 << 30;

/// The budget.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    refused: AtomicU64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More than the whole budget: retrying cannot help (413).
    TooLarge { need: u64, limit: u64 },
    /// Held by other requests now (503 + `Retry-After`).
    Busy { need: u64, used: u64, limit: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::util::mem::human_bytes as h;
        match *self {
            Refusal::TooLarge { need, limit } => write!(
                f,
                "this request needs about {} in memory, more than the server's whole budget of {} \
                 for requests in flight (--max-inflight-bytes)",
                h(need),
                h(limit)
            ),
            Refusal::Busy { need, used, limit } => write!(
                f,
                "the server's memory budget for requests in flight is taken: {} of {} \
                 (--max-inflight-bytes) held, this request needs about {} more",
                h(used),
                h(limit),
                h(need)
            ),
        }
    }
}

/// Bytes held by one request; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Most bytes reserved at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Reservations refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// Take `n` more bytes, or refuse without taking anything.
    fn take(&self, n: u64) -> Result<(), Refusal> {
        if n > self.limit {
            self.refused.fetch_add(1, Ordering::AcqRel);
            return Err(Refusal::TooLarge {
                need: n,
                limit: self.limit,
            });
        }
        match self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            }) {
            Ok(before) => {
                self.peak
                    .fetch_max(before.saturating_add(n), Ordering::AcqRel);
                Ok(())
            }
            Err(used) => {
                self.refused.fetch_add(1, Ordering::AcqRel);
                Err(Refusal::Busy {
                    need: n,
                    used,
                    limit: self.limit,
                })
            }
        }
    }

    /// Reserve `bytes` (0 is a valid start that [`Reservation::grow_to`] raises later).
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Refusal> {
        self.take(bytes)?;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hold `total` bytes in all (nothing changes when it already holds as many); on refusal
    /// it keeps what it held. The request being refused, the caller drops it.
    pub fn grow_to(&mut self, total: u64) -> Result<(), Refusal> {
        let Some(more) = total.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return Ok(());
        };
        if total > self.budget.limit {
            self.budget.refused.fetch_add(1, Ordering::AcqRel);
            return Err(Refusal::TooLarge {
                need: total,
                limit: self.budget.limit,
            });
        }
        self.budget.take(more).map_err(|r| match r {
            Refusal::Busy { used, limit, .. } => Refusal::Busy {
                need: total,
                used: used.saturating_sub(self.bytes),
                limit,
            },
            r => r,
        })?;
        self.bytes = total;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Peak bytes one segmentation request holds, from its body and image header, the model's
/// input size `s` and nothing decoded: the largest of its stages (each counts what is alive
/// then, in `api::run_segment`'s order):
/// - decode: the body, the decoder's copy of a JPEG, the decoder's output and its 8-bit RGB;
/// - prepare: the RGB image, the resized `3·s²` u8 and the `3·s²` f32 input;
/// - run: the input and its copy in the task's batch, the `s²` logits;
/// - answer: the logits and probabilities at `s²`, probabilities at the original resolution
///   (f32), the mask, its grey image and the PNG (at most about one byte per pixel).
pub fn segment_bytes(body: u64, width: u32, height: u32, decoded: u64, s: usize) -> u64 {
    let px = u64::from(width) * u64::from(height);
    let s2 = (s as u64).saturating_mul(s as u64);
    let decode = body
        .saturating_mul(2)
        .saturating_add(decoded)
        .saturating_add(px.saturating_mul(3));
    let prepare = px
        .saturating_mul(3)
        .saturating_add(s2.saturating_mul(3 + 12));
    let run = s2.saturating_mul(12 * 2 + 4);
    let answer = s2
        .saturating_mul(8)
        .saturating_add(px.saturating_mul(4 + 1 + 1 + 1));
    decode.max(prepare).max(run).max(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_counted_refused_and_given_back() {
        let b = Budget::new(100);
        let mut a = b.reserve(30).unwrap();
        let c = b.reserve(50).unwrap();
        assert_eq!(b.used(), 80);
        assert!(matches!(
            b.reserve(30),
            Err(Refusal::Busy {
                need: 30,
                used: 80,
                limit: 100
            })
        ));
        assert!(matches!(b.reserve(101), Err(Refusal::TooLarge { .. })));
        // Growing within the budget; past it keeps what was held.
        a.grow_to(50).unwrap();
        assert_eq!((a.bytes(), b.used()), (50, 100));
        assert!(a.grow_to(60).is_err());
        assert_eq!((a.bytes(), b.used()), (50, 100));
        assert!(matches!(a.grow_to(200), Err(Refusal::TooLarge { .. })));
        a.grow_to(10).unwrap();
        assert_eq!(a.bytes(), 50, "never shrinks");
        drop(c);
        assert_eq!(b.used(), 50);
        drop(a);
        assert_eq!((b.used(), b.peak(), b.refused()), (0, 100, 4));
    }

    #[test]
    fn a_large_16_bit_image_is_counted_at_its_decoded_size() {
        // 7300×5440 16-bit RGB (the case of issue 27): 238 MB decoded + 119 MB of RGB.
        let (w, h) = (7300u32, 5440u32);
        let px = u64::from(w) * u64::from(h);
        let n = segment_bytes(308_000, w, h, px * 6, 1024);
        assert_eq!(n, 2 * 308_000 + px * 9);
        // A small image on a large model: the model's stages dominate.
        assert_eq!(segment_bytes(1000, 10, 10, 300, 1024), 1024 * 1024 * 28);
    }
}
