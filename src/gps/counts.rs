//! Parameter counts under a policy: per tensor selected / trainable / frozen / total entries,
//! and totals grouped by top-level component (`image_encoder`, `mask_decoder`, …).
//!
//! Works from shapes alone ([`Counts::from_shapes`], neuron-level budget rows·min(K, cols),
//! which is also the budget of the layer and net levels), so counts for large models are
//! instant and allocate no weights; or from an actual [`Selection`] ([`Counts::from_selection`]).

use super::policy::{Policy, Treatment};
use super::select::{budget, Selection};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Entry counts of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorCount {
    pub name: String,
    pub shape: Vec<usize>,
    pub treatment: Treatment,
    /// Entries selected per neuron (0 unless `Selected`).
    pub selected: usize,
    /// Entries of a fully trainable tensor (0 unless `Trainable`).
    pub trainable: usize,
    /// Entries that never change.
    pub frozen: usize,
    pub total: usize,
}

/// Summed counts (a group or the whole model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountTotals {
    pub selected: usize,
    pub trainable: usize,
    pub frozen: usize,
    pub total: usize,
}

impl CountTotals {
    /// Entries that train: selected + fully trainable.
    pub fn tuned(&self) -> usize {
        self.selected + self.trainable
    }

    /// Tuned entries as a percentage of all entries.
    pub fn tuned_pct(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.tuned() as f64 / self.total as f64
        }
    }

    fn add(&mut self, c: &TensorCount) {
        self.selected += c.selected;
        self.trainable += c.trainable;
        self.frozen += c.frozen;
        self.total += c.total;
    }
}

/// Per-tensor counts, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub tensors: Vec<TensorCount>,
}

impl Counts {
    /// Counts from shapes only: `Selected` tensors contribute rows·min(K, cols).
    pub fn from_shapes(shapes: &[(String, Vec<usize>)], policy: &Policy, k: usize) -> Self {
        let mut tensors: Vec<TensorCount> = shapes
            .iter()
            .map(|(name, shape)| {
                let total: usize = shape.iter().product();
                let treatment = policy.treatment(name, shape);
                let (selected, trainable) = match treatment {
                    Treatment::Selected => (budget(shape, k), 0),
                    Treatment::Trainable => (0, total),
                    Treatment::Frozen => (0, 0),
                };
                TensorCount {
                    name: name.clone(),
                    shape: shape.clone(),
                    treatment,
                    selected,
                    trainable,
                    frozen: total - selected - trainable,
                    total,
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Counts { tensors }
    }

    /// Counts of an actual selection over all tensors in `shapes` (names the selection does
    /// not mention are frozen).
    pub fn from_selection(shapes: &[(String, Vec<usize>)], sel: &Selection) -> Self {
        let trainable: std::collections::HashSet<&String> = sel.trainable.iter().collect();
        let mut tensors: Vec<TensorCount> = shapes
            .iter()
            .map(|(name, shape)| {
                let total: usize = shape.iter().product();
                let (treatment, selected, tr) = if let Some(i) = sel.indices.get(name) {
                    (Treatment::Selected, i.len(), 0)
                } else if trainable.contains(name) {
                    (Treatment::Trainable, 0, total)
                } else {
                    (Treatment::Frozen, 0, 0)
                };
                TensorCount {
                    name: name.clone(),
                    shape: shape.clone(),
                    treatment,
                    selected,
                    trainable: tr,
                    frozen: total.saturating_sub(selected + tr),
                    total,
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Counts { tensors }
    }

    /// Totals over every tensor.
    pub fn totals(&self) -> CountTotals {
        let mut t = CountTotals::default();
        for c in &self.tensors {
            t.add(c);
        }
        t
    }

    /// Totals over tensors whose name starts with `prefix`.
    pub fn totals_with_prefix(&self, prefix: &str) -> CountTotals {
        let mut t = CountTotals::default();
        for c in self.tensors.iter().filter(|c| c.name.starts_with(prefix)) {
            t.add(c);
        }
        t
    }

    /// Totals per top-level component (text before the first `.`).
    pub fn groups(&self) -> BTreeMap<String, CountTotals> {
        let mut g: BTreeMap<String, CountTotals> = BTreeMap::new();
        for c in &self.tensors {
            let key = c.name.split('.').next().unwrap_or("").to_string();
            g.entry(key).or_default().add(c);
        }
        g
    }

    /// A per-tensor table (long; for `--verbose` reports).
    pub fn tensor_table(&self) -> String {
        let mut s = format!(
            "{:<64} {:>18} {:>9} {:>10} {:>10} {:>10}\n",
            "tensor", "shape", "role", "selected", "trainable", "total"
        );
        for c in &self.tensors {
            s.push_str(&format!(
                "{:<64} {:>18} {:>9} {:>10} {:>10} {:>10}\n",
                c.name,
                format!("{:?}", c.shape),
                format!("{:?}", c.treatment).to_lowercase(),
                c.selected,
                c.trainable,
                c.total
            ));
        }
        s
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl fmt::Display for Counts {
    /// Per-component table plus totals: selected-per-neuron vs fully trainable entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:>14} {:>14} {:>14} {:>14} {:>9}",
            "component", "selected", "trainable", "tuned", "total", "tuned %"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, t: &CountTotals| {
            writeln!(
                f,
                "{:<16} {:>14} {:>14} {:>14} {:>14} {:>8.4}%",
                name,
                thousands(t.selected),
                thousands(t.trainable),
                thousands(t.tuned()),
                thousands(t.total),
                t.tuned_pct()
            )
        };
        for (g, t) in self.groups() {
            row(f, &g, &t)?;
        }
        row(f, "total", &self.totals())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gps::policy::Rule;

    #[test]
    fn counts_from_shapes_split_selected_and_trainable() {
        let p = Policy {
            name: "t".into(),
            rules: vec![
                Rule::new("enc.*.bias", Treatment::Trainable),
                Rule::new("enc.*", Treatment::Selected),
                Rule::new("dec.*", Treatment::Trainable),
            ],
            default: Treatment::Frozen,
        };
        let shapes = vec![
            ("enc.a.weight".to_string(), vec![4, 3, 2, 2]),
            ("enc.a.bias".to_string(), vec![4]),
            ("dec.w".to_string(), vec![5, 2]),
            ("pos".to_string(), vec![7]),
        ];
        let c = Counts::from_shapes(&shapes, &p, 2);
        let t = c.totals();
        assert_eq!((t.selected, t.trainable, t.total), (8, 14, 48 + 4 + 10 + 7));
        assert_eq!(t.frozen, t.total - 22);
        assert_eq!(c.totals_with_prefix("enc.").tuned(), 12);
        assert_eq!(c.groups().len(), 3);
        let k_big = Counts::from_shapes(&shapes, &p, 100).totals();
        assert_eq!(k_big.selected, 48);
        assert!(c.to_string().contains("total"));
        assert_eq!(thousands(4064560), "4,064,560");
        assert_eq!(thousands(12), "12");
    }
}
