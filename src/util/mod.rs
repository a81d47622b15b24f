//! Small shared helpers: seeded RNG, atomic file writes, tensor files, where a wheel-installed
//! binary finds its data.

pub mod cpu;
pub mod draw;
pub mod fs;
pub mod hash;
pub mod html;
pub mod install;
pub mod mem;
pub mod rng;
pub mod tensors;
pub mod threads;

pub use rng::Rng;
