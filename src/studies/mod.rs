//! Studies over many training runs — the evidence tables: every variant × training-set size ×
//! seed trained by the one loop on one grid ([`grid`]), test scores per image kept, mean ± std over seeds and paired
//! bootstrap intervals against a reference variant ([`crate::stats`]). [`kvasir`]
//! (segmentation), [`classify`] (classification).

pub mod classify;
pub mod grid;
pub mod kvasir;
