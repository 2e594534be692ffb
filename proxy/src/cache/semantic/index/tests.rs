use super::*;
use std::time::Duration;

/// A deterministic pseudo-random generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 0.5) * n as f32) as usize % n
    }

    fn unit(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM).map(|_| self.next()).collect();
        normalised(v)
    }

    /// A unit vector at cosine about `cos` to the unit vector `to`.
    fn near(&mut self, to: &[f32], cos: f32) -> Vec<f32> {
        let noise = self.unit();
        let side = (1.0 - cos * cos).sqrt();
        normalised(
            to.iter()
                .zip(&noise)
                .map(|(a, n)| a * cos + n * side)
                .collect(),
        )
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
    v
}

fn unit(seed: u32) -> Vec<f32> {
    Rng(u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).unit()
}

fn key(i: usize) -> Key {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k[31] = 1;
    Key(k)
}

/// Vectors grouped by topic, as embeddings of one tenant's prompts are: each at cosine
/// about 0.7 to its topic's centre (about 0.5 to others of its topic).
fn topical(rng: &mut Rng, n: usize, topics: usize) -> Vec<Vec<f32>> {
    let centres: Vec<Vec<f32>> = (0..topics).map(|_| rng.unit()).collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.below(topics)];
            rng.near(c, 0.7)
        })
        .collect()
}

/// Every entry is where the index says, and each list's centroid is its mean.
fn check(index: &Index) {
    let mut seen = 0;
    for (pk, part) in &index.parts {
        let len: usize = part.lists.iter().map(List::len).sum();
        assert_eq!(len, part.len);
        assert!(part.lists.iter().all(|l| l.len() > 0), "an empty list");
        for (l, list) in part.lists.iter().enumerate() {
            assert_eq!(list.vectors.len(), list.len() * DIM);
            for (pos, m) in list.entries.iter().enumerate() {
                let at = index.at[&m.key];
                assert_eq!((at.partition, at.list, at.pos), (*pk, l, pos));
            }
            let mut mean = vec![0.0f32; DIM];
            for v in list.vectors.chunks_exact(DIM) {
                mean.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            let mean = normalised(mean);
            assert!(cosine(&mean, &list.centroid) > 0.999, "a stale centroid");
        }
        seen += len;
    }
    assert_eq!(seen, index.len());
    assert_eq!(index.expiry.len(), index.len());
}

#[tokio::test(start_paused = true)]
async fn entries_are_found_in_their_partition_until_they_expire_or_leave() {
    let mut index = Index::default();
    let (p, q) = (Key([1; 32]), Key([2; 32]));
    let now = Instant::now();
    let ttl = Duration::from_secs(60);
    for i in 0..10u8 {
        index.insert(
            p,
            Key([10 + i; 32]),
            format!("t{i}"),
            &unit(u32::from(i)),
            now + ttl,
        );
    }
    index.insert(q, Key([99; 32]), "other".into(), &unit(3), now + ttl);
    let hits = index.search(&p, &unit(3), 0.99, now, 4);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].key, Key([13; 32]));
    // Another partition's identical vector is not seen.
    assert!(
        index
            .search(&Key([3; 32]), &unit(3), 0.5, now, 4)
            .is_empty()
    );
    // Removing moves the last entry into the hole; every other entry is still found.
    assert!(index.remove(&Key([13; 32])));
    assert!(index.search(&p, &unit(3), 0.99, now, 4).is_empty());
    for i in (0..10u8).filter(|&i| i != 3) {
        let hits = index.search(&p, &unit(u32::from(i)), 0.99, now, 4);
        assert_eq!(
            hits.first().map(|c| c.key),
            Some(Key([10 + i; 32])),
            "entry {i}"
        );
    }
    // At the expiry instant, gone.
    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    assert_eq!(index.search(&p, &unit(5), 0.99, Instant::now(), 4).len(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        index
            .search(&p, &unit(5), 0.99, Instant::now(), 4)
            .is_empty()
    );
    assert_eq!(index.expire(Instant::now()).len(), 10);
    assert!(index.is_empty());
    assert_eq!(index.bytes(), 0);
}

#[test]
fn over_its_budget_the_index_drops_the_soonest_to_expire() {
    let mut index = Index::default();
    let now = Instant::now();
    for i in 0..4u8 {
        let expires = now + Duration::from_secs(100 - u64::from(i));
        index.insert(
            Key([0; 32]),
            Key([i; 32]),
            "x".into(),
            &unit(u32::from(i)),
            expires,
        );
    }
    let gone = index.shrink_to(entry_bytes("x") * 2, 100);
    assert_eq!(gone, vec![Key([3; 32]), Key([2; 32])]);
    assert_eq!(index.len(), 2);
}

const SMALL: Params = Params {
    exact_max: 150,
    list_max: 32,
    probes: 6,
};

#[test]
fn a_large_partition_is_searched_in_its_nearest_lists_and_finds_what_the_scan_finds() {
    let mut rng = Rng(7);
    let mut index = Index::with_params(SMALL);
    let (p, far) = (Key([1; 32]), Instant::now() + Duration::from_secs(3600));
    let vectors = topical(&mut rng, 1500, 40);
    for (i, v) in vectors.iter().enumerate() {
        index.insert(p, key(i), format!("t{i}"), v, far);
    }
    check(&index);
    let lists = index.parts[&p].lists.len();
    // Lists were split as the partition grew: a lookup scans 6 of them.
    assert!(lists >= 1500 / 32, "{lists} lists");
    let now = Instant::now();
    let (mut same, mut asked) = (0, 0);
    for _ in 0..200 {
        // A prompt near a stored one (cosine 0.90-0.99): what a semantic hit looks like.
        let of = rng.below(vectors.len());
        let cos = 0.90 + 0.09 * (rng.next() + 0.5);
        let q = rng.near(&vectors[of], cos);
        let exact = index.search_exact(&p, &q, 0.8, now, 1);
        let approx = index.search(&p, &q, 0.8, now, 1);
        let Some(best) = exact.first() else { continue };
        asked += 1;
        if approx.first().map(|c| c.key) == Some(best.key) {
            same += 1;
        }
    }
    assert!(asked > 180, "{asked}");
    let recall = f64::from(same) / f64::from(asked);
    assert!(recall >= 0.97, "recall@1 {recall:.3} ({same}/{asked})");
    // A far query: nothing above the threshold, approximate or exact.
    let q = rng.unit();
    assert!(index.search(&p, &q, 0.8, now, 8).is_empty());
}

#[test]
fn a_partition_up_to_its_exact_size_is_scanned_whole() {
    let mut rng = Rng(11);
    let mut index = Index::with_params(Params {
        exact_max: 500,
        ..SMALL
    });
    let (p, far) = (Key([1; 32]), Instant::now() + Duration::from_secs(3600));
    for (i, v) in topical(&mut rng, 500, 20).iter().enumerate() {
        index.insert(p, key(i), String::new(), v, far);
    }
    assert!(index.parts[&p].lists.len() > SMALL.probes);
    let now = Instant::now();
    for _ in 0..20 {
        let q = rng.unit();
        // Every entry is compared: the same candidates, in the same order, as the scan.
        assert_eq!(
            index.search(&p, &q, -1.0, now, 20),
            index.search_exact(&p, &q, -1.0, now, 20)
        );
    }
}

#[test]
fn removing_entries_of_split_lists_leaves_them_unfound_and_the_rest_in_place() {
    let mut rng = Rng(3);
    let mut index = Index::with_params(SMALL);
    let (p, far) = (Key([1; 32]), Instant::now() + Duration::from_secs(3600));
    let vectors = topical(&mut rng, 900, 30);
    for (i, v) in vectors.iter().enumerate() {
        index.insert(p, key(i), format!("t{i}"), v, far);
    }
    let bytes = index.bytes();
    // Every third entry leaves (evicted), then half the rest come back in another order.
    for i in (0..900).step_by(3) {
        assert!(index.remove(&key(i)));
        assert!(!index.remove(&key(i)));
    }
    check(&index);
    let now = Instant::now();
    for (i, v) in vectors.iter().enumerate().step_by(7) {
        let found = index.search_exact(&p, v, 0.9999, now, 4);
        let here = found.iter().any(|c| c.key == key(i));
        assert_eq!(here, i % 3 != 0, "entry {i}");
    }
    for i in (0..900).step_by(3).rev() {
        index.insert(p, key(i), format!("t{i}"), &vectors[i], far);
    }
    check(&index);
    assert_eq!(index.bytes(), bytes);
    for k in 0..900 {
        index.remove(&key(k));
    }
    assert!(index.is_empty() && index.parts.is_empty());
    assert_eq!(index.bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn entries_of_a_large_partition_expire_at_their_instant() {
    let mut rng = Rng(5);
    let mut index = Index::with_params(SMALL);
    let p = Key([1; 32]);
    let now = Instant::now();
    let vectors = topical(&mut rng, 400, 10);
    for (i, v) in vectors.iter().enumerate() {
        // Half live a minute, half an hour.
        let ttl = Duration::from_secs(if i % 2 == 0 { 60 } else { 3600 });
        index.insert(p, key(i), String::new(), v, now + ttl);
    }
    tokio::time::advance(Duration::from_secs(60) - Duration::from_millis(1)).await;
    assert!(index.expire(Instant::now()).is_empty());
    let found = index.search(&p, &vectors[0], 0.9999, Instant::now(), 1);
    assert_eq!(found.first().map(|c| c.key), Some(key(0)));
    tokio::time::advance(Duration::from_millis(1)).await;
    // At the instant: not served even before the sweep, then swept.
    assert!(
        index
            .search(&p, &vectors[0], 0.9999, Instant::now(), 1)
            .is_empty()
    );
    assert_eq!(index.expire(Instant::now()).len(), 200);
    check(&index);
    assert_eq!(index.len(), 200);
}

#[test]
fn identical_vectors_are_not_split_forever() {
    let mut index = Index::with_params(SMALL);
    let (p, far) = (Key([1; 32]), Instant::now() + Duration::from_secs(3600));
    let v = unit(1);
    for i in 0..500 {
        index.insert(p, key(i), String::new(), &v, far);
    }
    check(&index);
    assert_eq!(index.len(), 500);
    let found = index.search(&p, &v, 0.99, Instant::now(), 1000);
    assert_eq!(found.len(), 500);
}
