//! Which shard (Raft group) a conversation lives in.
//!
//! A stable hash of the conversation id's bytes (64-bit FNV-1a) modulo the shard count,
//! which is fixed when the cluster is created. FNV-1a is specified in a few lines, so
//! every client and every future version computes the same shard.

/// A shard (Raft group) number.
pub type GroupId = u32;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The shard of `conversation_id` among `shards` shards (`shards > 0`).
pub fn shard_of(conversation_id: &str, shards: u32) -> GroupId {
    (fnv1a64(conversation_id.as_bytes()) % u64::from(shards.max(1))) as GroupId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_published_fnv1a64() {
        // Reference values of FNV-1a 64 (from its specification's test vectors).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn shards_spread_and_stay_in_range() {
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            let s = shard_of(&format!("conv-{i}"), 16);
            seen[s as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }
}
