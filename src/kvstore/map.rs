//! The map itself: a sorted base from the last snapshot and persistent layers of the writes
//! since (an O(1) capture for a snapshot), and its snapshot encoding.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

use bytes::Bytes;

use super::run::{NotARun, Run, RunBuilder};

use crate::channels::SnapshotSource;

/// The committed key-value pairs. Keys are the request paths, as raftexample has them.
///
/// A sorted [`Run`] as the base (the map as of the last snapshot, in the snapshot's own
/// encoding, so loading or installing a snapshot is one scan and no copy), and persistent
/// B-tree layers of the writes since (see [`Pair`] for their cost). Cloning is O(1), so a
/// snapshot or a backup captures the map without stopping anything and serialises it
/// elsewhere. It serialises in key order, as the `std` map raftexample used would.
///
/// A snapshot [`Map::freeze`]s the writes it covers; the snapshot writer merges them with the
/// base into the snapshot file, noting where each pair lands, and [`Map::rebase`] then makes
/// the file, mapped, the base. Between the two, reads look in three places.
#[derive(Clone, Debug, Default)]
pub struct Map {
    pub(super) base: Arc<Run>,
    /// Writes captured by a snapshot still being written, with the capture's number.
    pub(super) frozen: Option<(u64, Layer)>,
    /// Writes since.
    pub(super) top: Layer,
    /// The index of the snapshot from the leader that the base was loaded from, until the
    /// base changes (see [`Map::adopt`]).
    pub(super) installed: Option<u64>,
}

/// Writes above the base. A B-tree rather than imbl's HAMT: measured with the benchmark's
/// keys, its nodes cost 39 bytes per key at any size where the HAMT's cost 54 at 280,000 keys
/// and 123 at 100,000 (sparse leaves), and inserts with periodic captures ran about 3x
/// faster, lookups no slower.
type Layer = imbl::OrdMap<Pair, ()>;

/// Numbers freezes across every map, so a rebase computed for one capture never applies to a
/// map that was replaced (by a snapshot from the leader) and frozen again meanwhile.
static FREEZES: AtomicU64 = AtomicU64::new(1);

/// Equal keys with equal values.
impl PartialEq for Map {
    fn eq(&self, other: &Map) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Map {}

type KV<'a> = (&'a [u8], &'a [u8]);

/// Two key-ordered sequences as one; on equal keys `a`'s pair wins (it is the newer write).
fn merge<'a>(
    a: impl Iterator<Item = KV<'a>>,
    b: impl Iterator<Item = KV<'a>>,
) -> impl Iterator<Item = KV<'a>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) => match x.0.cmp(y.0) {
            std::cmp::Ordering::Less => a.next(),
            std::cmp::Ordering::Greater => b.next(),
            std::cmp::Ordering::Equal => {
                b.next();
                a.next()
            }
        },
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

fn layer_iter(l: &Layer) -> impl Iterator<Item = KV<'_>> {
    l.keys().map(|p| (p.key(), p.value()))
}

impl Map {
    pub fn new() -> Map {
        Map::default()
    }

    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.insert_pair(Pair::new(key, value));
    }

    pub fn insert_pair(&mut self, pair: Pair) {
        // Replaces the stored pair, key included.
        self.top.insert(pair, ());
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if let Some((p, _)) = self.top.get_key_value(key) {
            return Some(p.value());
        }
        if let Some((p, _)) = self.frozen.as_ref().and_then(|(_, f)| f.get_key_value(key)) {
            return Some(p.value());
        }
        self.base.get(key)
    }

    /// The number of keys. O(n) once there are writes above the base: keeping a count would
    /// cost every insert a lookup in each layer below (in a large base, cache misses that made
    /// up most of replaying the log at a restart), and only a snapshot or a backup, which
    /// pass over every pair anyway, needs it.
    pub fn len(&self) -> usize {
        if self.top.is_empty() && self.frozen.is_none() {
            return self.base.len();
        }
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Every pair, in key order.
    pub fn iter(&self) -> impl Iterator<Item = KV<'_>> {
        let frozen = self.frozen.iter().flat_map(|(_, f)| layer_iter(f));
        merge(layer_iter(&self.top), merge(frozen, self.base.iter()))
    }

    /// [`Self::iter`] for one pass over the whole map (a snapshot, a backup): the pages of a
    /// mapped base that the pass has left behind are let go (see [`Run::passed`]).
    pub fn pass(&self) -> impl Iterator<Item = KV<'_>> {
        let mut behind = 0;
        self.iter()
            .inspect(move |&(_, v)| self.base.passed(v, &mut behind))
    }

    /// Starts a snapshot: the writes so far join the frozen layer, and later ones go to a new
    /// top. Returns the capture's number for [`Map::rebase`].
    pub fn freeze(&mut self) -> u64 {
        let top = std::mem::take(&mut self.top);
        let frozen = match self.frozen.take() {
            // A snapshot that failed left its layer: the new one covers both.
            Some((_, mut older)) => {
                for p in top.keys() {
                    older.insert(p.clone(), ());
                }
                older
            }
            None => top,
        };
        let n = FREEZES.fetch_add(1, AtomicOrdering::Relaxed);
        self.frozen = Some((n, frozen));
        n
    }

    /// Makes `base`, built from the base and frozen layer of capture `n`, the base, unless the
    /// map changed under that capture.
    pub fn rebase(&mut self, n: u64, base: Run) {
        if self.frozen.as_ref().is_some_and(|(f, _)| *f == n) {
            self.base = Arc::new(base);
            self.frozen = None;
            self.installed = None;
        }
    }

    /// Reads the base from `data`, the same bytes as the base loaded from the leader's snapshot
    /// `index`, now in its file, if the base is still that one. Returns whether it did.
    pub fn adopt(&mut self, index: u64, data: Bytes, pages: Option<crate::vfs::Pages>) -> bool {
        if self.installed != Some(index) || self.base.encoded_len() != data.len() {
            return false;
        }
        // A capture (a snapshot being written, a backup) may share the base; it keeps the old.
        Arc::make_mut(&mut self.base).set_data(data, pages);
        self.installed = None;
        true
    }

    /// The map a snapshot encoded; its pairs are not copied when it is a [`Run`], as every
    /// snapshot written by this crate is.
    pub fn from_encoded(data: Bytes) -> Result<Map, DecodeError> {
        match Run::parse(data.clone()) {
            Ok(run) => Ok(Map {
                base: Arc::new(run),
                ..Map::default()
            }),
            Err(NotARun::Unsorted) => decode(&data),
            Err(NotARun::Bad(e)) => Err(e),
        }
    }
}

/// A key and its value as the snapshot and the PUT entry both encode them: `[key length: u64
/// LE][key][value length: u64 LE][value]`. Ordered and compared by key alone, so the map finds
/// it by a `&[u8]` key.
///
/// Applied from an entry, it is a slice of the entry's data, not a copy: the raft log holds the
/// entries since the last snapshot anyway, and the next snapshot moves every pair into the
/// base, so sharing bounds the layers' memory by what the log already holds (a copy doubled
/// it: with 16 KiB values a joining member held each value twice while it caught up).
#[derive(Clone, Debug)]
pub struct Pair(Bytes);

impl Pair {
    pub fn new(key: &[u8], value: &[u8]) -> Pair {
        let mut buf = Vec::with_capacity(16 + key.len() + value.len());
        put_bytes(&mut buf, key)
            .and_then(|()| put_bytes(&mut buf, value))
            .expect("writing to a Vec cannot fail");
        Pair(buf.into())
    }

    /// A pair encoded in an entry's data (a PUT's encoding after its id), checked by
    /// [`super::decode_pairs`].
    pub fn in_entry(encoded: Bytes) -> Pair {
        Pair(encoded)
    }

    fn key_len(&self) -> usize {
        let (len, _) = self
            .0
            .split_first_chunk::<8>()
            .expect("built with a length");
        u64::from_le_bytes(*len) as usize
    }

    fn key(&self) -> &[u8] {
        &self.0[8..8 + self.key_len()]
    }

    fn value(&self) -> &[u8] {
        &self.0[16 + self.key_len()..]
    }
}

impl Ord for Pair {
    fn cmp(&self, other: &Pair) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Pair) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Pair {
    fn eq(&self, other: &Pair) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Pair {}

impl std::borrow::Borrow<[u8]> for Pair {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

/// Bytes of encoded pairs handed to the snapshot writer at once.
pub(super) const WRITE_CHUNK: usize = 64 << 10;

/// A map captured for a snapshot or a backup (an O(1) clone), written in the snapshot format:
/// the pair count, then each key and value with its length.
pub struct Captured(pub Map);

impl Captured {
    /// `(encoded length, pairs)`, in one pass over the layers and the base.
    pub fn sizes(&self) -> (u64, usize) {
        self.0.pass().fold((8, 0), |(len, n), (k, v)| {
            (len + 16 + k.len() as u64 + v.len() as u64, n + 1)
        })
    }

    /// Writes the map's `pairs` pairs (see [`Self::sizes`]) to `w`, and if `run` is given,
    /// notes where each starts.
    pub fn write_with(
        &self,
        w: &mut dyn Write,
        pairs: usize,
        mut run: Option<&mut RunBuilder>,
    ) -> io::Result<()> {
        // Pairs are gathered into chunks first: four small writes per pair through the
        // snapshot's CRC-counting writer cost more than the copying.
        let mut chunk = Vec::with_capacity(2 * WRITE_CHUNK);
        put_u64(&mut chunk, pairs as u64)?;
        for (k, v) in self.0.pass() {
            let at = chunk.len();
            put_bytes(&mut chunk, k)?;
            put_bytes(&mut chunk, v)?;
            if let Some(run) = run.as_deref_mut() {
                run.push(chunk.len() - at);
            }
            if chunk.len() >= WRITE_CHUNK {
                w.write_all(&chunk)?;
                chunk.clear();
            }
        }
        w.write_all(&chunk)
    }
}

impl SnapshotSource for Captured {
    fn encoded_len(&self) -> u64 {
        self.sizes().0
    }

    fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        self.write_with(w, self.0.len(), None)
    }
}

/// A map in the snapshot format.
pub fn encode(map: &Map) -> Vec<u8> {
    let c = Captured(map.clone());
    let mut buf = Vec::with_capacity(c.encoded_len() as usize);
    c.write_to(&mut buf).expect("writing to a Vec cannot fail");
    buf
}

/// The map encoded by [`Captured`].
pub fn decode(mut buf: &[u8]) -> Result<Map, DecodeError> {
    let n = get_u64(&mut buf)?;
    let mut map = Map::new();
    for _ in 0..n {
        let k = get_bytes(&mut buf)?;
        let v = get_bytes(&mut buf)?;
        map.insert(k, v);
    }
    if !buf.is_empty() {
        return Err(DecodeError::Trailing(buf.len()));
    }
    Ok(map)
}

/// Why an entry or a snapshot does not decode.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("truncated")]
    Truncated,
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

pub(super) fn put_u64<W: Write + ?Sized>(w: &mut W, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

pub(super) fn put_bytes<W: Write + ?Sized>(w: &mut W, b: &[u8]) -> io::Result<()> {
    put_u64(w, b.len() as u64)?;
    w.write_all(b)
}

pub(super) fn get_u64(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let (n, rest) = buf.split_first_chunk::<8>().ok_or(DecodeError::Truncated)?;
    *buf = rest;
    Ok(u64::from_le_bytes(*n))
}

/// A length-prefixed slice; the length is checked against what is left before anything is
/// allocated, so a corrupt length cannot ask for gigabytes.
pub(super) fn get_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let n = get_u64(buf)?;
    if n > buf.len() as u64 {
        return Err(DecodeError::Truncated);
    }
    let (b, rest) = buf.split_at(n as usize);
    *buf = rest;
    Ok(b)
}
