//! Small shared helpers: seeded RNG, atomic file writes, tensor files.

pub mod cpu;
pub mod draw;
pub mod fs;
pub mod hash;
pub mod html;
pub mod mem;
pub mod rng;
pub mod tensors;
pub mod threads;

pub use rng::Rng;
