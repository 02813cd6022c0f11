//! A map of byte ranges to where their contents come from, with "later insert
//! wins" overwrites. Undo files are built from the union of a segment's ranges;
//! folding two undo files keeps, for every byte, the content applied last.

use std::collections::BTreeMap;

/// Where a range's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The range reads as zeroes.
    Zero,
    /// Bytes of input `file`, starting at `offset` for the range's first byte.
    File { file: usize, offset: u64 },
}

impl Source {
    fn advanced(self, by: u64) -> Self {
        match self {
            Self::Zero => Self::Zero,
            Self::File { file, offset } => Self::File { file, offset: offset + by },
        }
    }
}

/// Non-overlapping ranges `[start, end)` keyed by start.
#[derive(Default, Debug)]
pub struct RangeMap {
    map: BTreeMap<u64, (u64, Source)>,
}

impl RangeMap {
    /// Sets `[start, end)` to come from `src`, replacing what was there.
    pub fn insert(&mut self, start: u64, end: u64, src: Source) {
        if start >= end {
            return;
        }
        // Entries that may overlap: the one starting before `start`, and all
        // starting inside the range.
        let first = self.map.range(..start).next_back().map(|(&s, _)| s).filter(|&s| self.map[&s].0 > start);
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in first.into_iter().chain(inside) {
            let (e, old) = self.map.remove(&s).expect("listed above");
            if s < start {
                self.map.insert(s, (start, old));
            }
            if e > end {
                self.map.insert(end, (e, old.advanced(end - s)));
            }
        }
        self.map.insert(start, (end, src));
    }

    /// `(start, end, source)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.map.iter().map(|(&s, &(e, src))| (s, e, src))
    }

    /// Bytes covered.
    pub fn covered(&self) -> u64 {
        self.iter().map(|(s, e, _)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A byte-level model: which input byte each position comes from.
    fn model(ops: &[(u64, u64, u8)], size: u64) -> Vec<Option<(u8, u64)>> {
        let mut m = vec![None; size as usize];
        for &(s, e, f) in ops {
            for (i, slot) in m.iter_mut().enumerate().take(e as usize).skip(s as usize) {
                *slot = Some((f, 1000 * f as u64 + i as u64 - s));
            }
        }
        m
    }

    proptest! {
        #[test]
        fn matches_a_byte_level_model(ops in proptest::collection::vec((0u64..200, 1u64..60, 0u8..4), 1..20)) {
            let ops: Vec<(u64, u64, u8)> = ops.into_iter().map(|(s, l, f)| (s, (s + l).min(256), f)).collect();
            let mut map = RangeMap::default();
            for &(s, e, f) in &ops {
                map.insert(s, e, Source::File { file: f as usize, offset: 1000 * f as u64 });
            }
            let mut got = vec![None; 256];
            let mut last_end = 0;
            for (s, e, src) in map.iter() {
                prop_assert!(s >= last_end && s < e, "ranges overlap or are empty");
                last_end = e;
                let Source::File { file, offset } = src else { unreachable!() };
                for (k, slot) in got.iter_mut().enumerate().take(e as usize).skip(s as usize) {
                    *slot = Some((file as u8, offset + k as u64 - s));
                }
            }
            prop_assert_eq!(got, model(&ops, 256));
        }
    }
}
