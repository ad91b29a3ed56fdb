//! Which conversations of a group may have a record (a CONV key): a filter in memory that
//! answers "certainly not" for a conversation that never had one, so that applying a new
//! conversation's first envelope skips the sled lookup that would miss (with a million
//! conversations, nearly every envelope is some conversation's first, and that lookup walks
//! to a cold leaf of a big tree).
//!
//! Correctness rests on one rule: **no false negatives**. Every CONV key that exists in the
//! overlay or in sled for the filter's generation was inserted. The state machine keeps it
//! so by building the filter from a scan of the generation's CONV keys (at the first apply
//! after open, or after an install changed the generation) and by inserting every CONV key
//! an apply writes before the write reaches the overlay. Removed conversations stay in (a
//! false positive costs only the lookup the filter would have saved).
//!
//! A scalable Bloom filter: layers of growing size, each filled to `BITS_PER_ITEM` bits per
//! key; a key is looked up in every layer. Past `MAX_BITS` in all the filter gives up and
//! answers "maybe" for every key, which is always safe.

use std::hash::{Hash, Hasher};

/// Bits per key in a layer: with `HASHES` = 4, about 0.24% false positives per layer.
const BITS_PER_ITEM: usize = 16;
const HASHES: u64 = 4;
/// Keys the first layer holds; each further layer holds twice the one before.
const FIRST_CAPACITY: usize = 4096;
/// At most this many bits (16 MiB) per group; then every key is "maybe".
const MAX_BITS: usize = 128 << 20;

struct Layer {
    bits: Vec<u64>,
    /// Number of bits minus one (a power of two minus one).
    mask: u64,
    capacity: usize,
    count: usize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let nbits = (capacity * BITS_PER_ITEM).next_power_of_two().max(64);
        Layer { bits: vec![0; nbits / 64], mask: nbits as u64 - 1, capacity, count: 0 }
    }

    /// The word and bit of a key's `i`th position.
    fn position(&self, (h1, h2): (u64, u64), i: u64) -> (usize, u64) {
        let bit = h1.wrapping_add(i.wrapping_mul(h2)) & self.mask;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    fn contains(&self, h: (u64, u64)) -> bool {
        (0..HASHES).all(|i| {
            let (w, b) = self.position(h, i);
            self.bits[w] & b != 0
        })
    }

    fn insert(&mut self, h: (u64, u64)) {
        for i in 0..HASHES {
            let (w, b) = self.position(h, i);
            self.bits[w] |= b;
        }
        self.count += 1;
    }
}

fn hash(key: &[u8]) -> (u64, u64) {
    let mut s = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut s);
    let a = s.finish();
    // The second hash from the first, odd so that the positions of a key differ.
    let b = a.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (a, b)
}

/// The filter of one group's generation.
pub struct ConvFilter {
    generation: u32,
    layers: Vec<Layer>,
    bits: usize,
    max_bits: usize,
    /// Past `max_bits`: every key may be present.
    saturated: bool,
}

impl ConvFilter {
    pub fn new(generation: u32) -> ConvFilter {
        Self::with_max_bits(generation, MAX_BITS)
    }

    fn with_max_bits(generation: u32, max_bits: usize) -> ConvFilter {
        let first = Layer::new(FIRST_CAPACITY);
        let bits = first.bits.len() * 64;
        ConvFilter { generation, layers: vec![first], bits, max_bits, saturated: false }
    }

    /// The generation whose keys this filter holds.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Whether `key` may have been inserted (false: it certainly was not).
    pub fn may_contain(&self, key: &[u8]) -> bool {
        if self.saturated {
            return true;
        }
        let h = hash(key);
        self.layers.iter().any(|l| l.contains(h))
    }

    pub fn insert(&mut self, key: &[u8]) {
        if self.saturated {
            return;
        }
        let h = hash(key);
        if self.layers.iter().any(|l| l.contains(h)) {
            return;
        }
        let full = self.layers.last().is_none_or(|l| l.count >= l.capacity);
        if full {
            let capacity = self.layers.last().map_or(FIRST_CAPACITY, |l| l.capacity * 2);
            let layer = Layer::new(capacity);
            if self.bits + layer.bits.len() * 64 > self.max_bits {
                self.saturated = true;
                self.layers = Vec::new();
                return;
            }
            self.bits += layer.bits.len() * 64;
            self.layers.push(layer);
        }
        if let Some(l) = self.layers.last_mut() {
            l.insert(h);
        }
    }

    /// Bytes the filter holds.
    pub fn bytes(&self) -> usize {
        self.bits / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> Vec<u8> {
        format!("conversation-{i}").into_bytes()
    }

    #[test]
    fn every_inserted_key_is_reported_and_few_others_are() {
        let mut f = ConvFilter::new(7);
        for i in 0..300_000 {
            f.insert(&key(i));
        }
        // No false negative, across every layer the growth added.
        assert!((0..300_000).all(|i| f.may_contain(&key(i))));
        let false_positives = (1_000_000..1_100_000).filter(|i| f.may_contain(&key(*i))).count();
        // Each of the ~7 layers answers falsely for ~0.24% of keys.
        assert!(false_positives < 3_000, "{false_positives} of 100,000 absent keys reported present");
        assert!(f.bytes() < 2 << 20, "{} bytes for 300,000 keys", f.bytes());
        assert_eq!(f.generation(), 7);
    }

    #[test]
    fn a_key_inserted_twice_is_counted_once() {
        let mut f = ConvFilter::new(1);
        for _ in 0..10 * FIRST_CAPACITY {
            f.insert(b"the same conversation");
        }
        assert_eq!(f.layers.len(), 1, "repeated inserts of one key must not grow the filter");
    }

    #[test]
    fn past_its_bound_the_filter_reports_every_key() {
        let max_bits = 8 * FIRST_CAPACITY * BITS_PER_ITEM;
        let mut f = ConvFilter::with_max_bits(1, max_bits);
        let mut i = 0u64;
        while !f.saturated {
            f.insert(&key(i));
            i += 1;
        }
        assert!(i > 3 * FIRST_CAPACITY as u64, "saturated after only {i} keys");
        assert!(f.bytes() <= max_bits / 8);
        assert!(f.may_contain(b"never inserted"), "a saturated filter must answer maybe");
        assert!((0..i).step_by(997).all(|j| f.may_contain(&key(j))));
    }
}
