//! A fixed log-bucketed histogram of durations in milliseconds.
//!
//! Every histogram uses the same bins, so two of them merge by adding their
//! counts bin by bin: an hour's histograms add up to the day's, and the
//! channels' to the overall one, exactly as if the day's (or all
//! channels') durations had been counted in one histogram. A percentile is
//! then read from the merged counts.
//!
//! Bins: values below 16 ms have a bin each; above, every power of two is
//! split into 8 bins (the three bits after the leading one), so a value is
//! known to within 12.5 %. A percentile reports the middle of its bin.
//! Bins with no count are not stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Values below this have a bin of their own.
const EXACT_BELOW: u64 = 16;
/// Bins per power of two above `EXACT_BELOW`.
const SUB_BINS: u64 = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Histogram {
    bins: BTreeMap<u16, u64>,
}

/// The bin a value falls in.
pub fn bin_of(ms: u64) -> u16 {
    if ms < EXACT_BELOW {
        return ms as u16;
    }
    let exponent = 63 - u64::from(ms.leading_zeros()); // floor(log2), >= 4
    let sub = (ms >> (exponent - 3)) & (SUB_BINS - 1);
    (EXACT_BELOW + (exponent - 4) * SUB_BINS + sub) as u16
}

/// The smallest and largest value of a bin.
pub fn bin_range(bin: u16) -> (u64, u64) {
    let bin = u64::from(bin);
    if bin < EXACT_BELOW {
        return (bin, bin);
    }
    let exponent = (bin - EXACT_BELOW) / SUB_BINS + 4;
    let sub = (bin - EXACT_BELOW) % SUB_BINS;
    let width = 1u64 << (exponent - 3);
    let low = (SUB_BINS + sub) << (exponent - 3);
    (low, low.saturating_add(width - 1))
}

/// The value a percentile falling in `bin` reports: the bin's middle.
pub fn bin_value(bin: u16) -> u64 {
    let (low, high) = bin_range(bin);
    low + (high - low) / 2
}

impl Histogram {
    pub fn record(&mut self, ms: u64) {
        *self.bins.entry(bin_of(ms)).or_insert(0) += 1;
    }

    pub fn count(&self) -> u64 {
        self.bins.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bins.is_empty()
    }

    /// Adds `other`'s counts to this one's.
    pub fn merge(&mut self, other: &Histogram) {
        for (bin, n) in &other.bins {
            *self.bins.entry(*bin).or_insert(0) += n;
        }
    }

    /// The `q` quantile (0 < q <= 1) by nearest rank: the middle of the bin
    /// holding the ceil(q · n)-th smallest value; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (bin, count) in &self.bins {
            seen += count;
            if seen >= rank {
                return Some(bin_value(*bin));
            }
        }
        self.bins.keys().next_back().map(|b| bin_value(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_in_its_bin_and_bins_are_ordered() {
        let mut last_bin = 0;
        for ms in (0..5000u64).chain([65_535, 1 << 20, 86_400_000, u64::MAX / 3, u64::MAX]) {
            let bin = bin_of(ms);
            let (low, high) = bin_range(bin);
            assert!(
                low <= ms && ms <= high,
                "{ms} in bin {bin} = {low}..={high}"
            );
            assert!(bin >= last_bin || ms > 5000);
            last_bin = bin;
        }
        // Relative error at most 1/8 above the exact range.
        for ms in [16u64, 17, 100, 999, 3000, 123_456, 9_999_999] {
            let (low, high) = bin_range(bin_of(ms));
            assert!(
                (high - low) as f64 <= ms as f64 / 8.0,
                "{ms}: {low}..={high}"
            );
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=10 {
            h.record(ms);
        }
        assert_eq!(h.quantile(0.5), Some(5));
        assert_eq!(h.quantile(0.95), Some(10));
        assert_eq!(h.quantile(1.0), Some(10));
        h.record(2500);
        // 2500 lies in 2048 + 256 ..= 2048 + 2·256 - 1.
        assert_eq!(bin_range(bin_of(2500)), (2304, 2559));
        assert_eq!(h.quantile(1.0), Some(2304 + 127));
    }

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_values() {
        // Three "hours" of first-response times, merged into a "day".
        let hours: [&[u64]; 3] = [
            &[120, 900, 1_500, 2_800],
            &[30, 45, 61_000],
            &[2_999, 3_001, 3_002, 7, 800, 15_000, 4],
        ];
        let mut day = Histogram::default();
        let mut all = Histogram::default();
        for hour in hours {
            let mut h = Histogram::default();
            for ms in hour {
                h.record(*ms);
                all.record(*ms);
            }
            day.merge(&h);
        }
        assert_eq!(day, all);
        assert_eq!(day.count(), 14);
        let mut sorted: Vec<u64> = hours.concat();
        sorted.sort();
        for q in [0.5, 0.9, 0.95, 0.99] {
            let rank = (q * sorted.len() as f64).ceil() as usize;
            let exact = sorted[rank - 1];
            assert_eq!(day.quantile(q), Some(bin_value(bin_of(exact))), "q={q}");
        }
        // Merging is order-independent.
        let mut other = Histogram::default();
        for hour in hours.iter().rev() {
            let mut h = Histogram::default();
            hour.iter().for_each(|ms| h.record(*ms));
            other.merge(&h);
        }
        assert_eq!(other, day);
    }

    #[test]
    fn round_trips_through_json() {
        let mut h = Histogram::default();
        [5u64, 5, 700, 70_000].iter().for_each(|ms| h.record(*ms));
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<Histogram>(&json).unwrap(), h);
    }
}
