//! A sorted run: the map's pairs in the snapshot encoding, held as the one buffer the snapshot
//! was read or received into, plus the offset of every pair. It is the map's base; the writes
//! since the snapshot sit in persistent layers above it (see [`super::Map`]).
//!
//! Why: a pair in its own allocation under a B-tree costs about 150 bytes of memory for a
//! 10-byte key and a 64-byte value, and loading a snapshot meant 1.5 million allocations and
//! inserts; here a pair costs its encoding plus 8 bytes, and loading is one scan.

use bytes::Bytes;

use super::map::DecodeError;
use crate::vfs::Pages;

/// How much of a mapped run a pass over it leaves behind before letting those pages go.
const FORGET_EVERY: usize = 1 << 20;

/// Pairs encoded as the snapshot has them (`[count: u64][key len: u64][key][value len:
/// u64][value]...`), keys strictly ascending.
#[derive(Clone, Debug, Default)]
pub struct Run {
    data: Bytes,
    /// Where each pair's key length starts in `data`.
    offsets: Offsets,
    /// The mapping `data` lies in, if it is a file written for this run (see [`RunBuilder`]).
    pages: Option<Pages>,
}

/// Pair offsets, 4 bytes each while the run is under 4 GiB (every run but the largest): at
/// 1.5 million small pairs that is 6 MB less for each member to hold.
#[derive(Clone, Debug)]
enum Offsets {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl Default for Offsets {
    fn default() -> Self {
        Offsets::Narrow(Vec::new())
    }
}

impl Offsets {
    fn for_run(data_len: u64, pairs: usize) -> Offsets {
        if data_len <= u64::from(u32::MAX) {
            Offsets::Narrow(Vec::with_capacity(pairs))
        } else {
            Offsets::Wide(Vec::with_capacity(pairs))
        }
    }

    /// `off` fits: [`Self::for_run`] chose the width from the run's size.
    fn push(&mut self, off: u64) {
        match self {
            Offsets::Narrow(v) => v.push(u32::try_from(off).expect("run under 4 GiB")),
            Offsets::Wide(v) => v.push(off),
        }
    }

    fn get(&self, i: usize) -> u64 {
        match self {
            Offsets::Narrow(v) => u64::from(v[i]),
            Offsets::Wide(v) => v[i],
        }
    }

    fn len(&self) -> usize {
        match self {
            Offsets::Narrow(v) => v.len(),
            Offsets::Wide(v) => v.len(),
        }
    }
}

#[cfg(test)]
impl PartialEq for Offsets {
    fn eq(&self, other: &Offsets) -> bool {
        self.len() == other.len() && (0..self.len()).all(|i| self.get(i) == other.get(i))
    }
}

/// Why an encoded map is not a run.
#[derive(Debug, PartialEq)]
pub enum NotARun {
    /// Damaged: the map cannot be decoded at all.
    Bad(DecodeError),
    /// Well-formed up to the first key out of ascending order (a map serialised by bincode from
    /// a hash map, as the first versions wrote): it must be sorted into a layer instead.
    Unsorted,
}

impl Run {
    /// Checks every length of `data` and that the keys ascend, noting where each pair starts.
    pub fn parse(data: Bytes) -> Result<Run, NotARun> {
        let mut buf = &data[..];
        let n = super::map::get_u64(&mut buf).map_err(NotARun::Bad)?;
        // Each pair takes at least 16 bytes, so a corrupt count cannot ask for gigabytes.
        let mut offsets =
            Offsets::for_run(data.len() as u64, n.min(buf.len() as u64 / 16) as usize);
        let mut prev: Option<&[u8]> = None;
        for _ in 0..n {
            offsets.push((data.len() - buf.len()) as u64);
            let k = super::map::get_bytes(&mut buf).map_err(NotARun::Bad)?;
            super::map::get_bytes(&mut buf).map_err(NotARun::Bad)?;
            if prev.is_some_and(|p| p >= k) {
                // The caller decodes it the slow way, which also finds any damage further on.
                return Err(NotARun::Unsorted);
            }
            prev = Some(k);
        }
        if !buf.is_empty() {
            return Err(NotARun::Bad(DecodeError::Trailing(buf.len())));
        }
        Ok(Run {
            data,
            offsets,
            pages: None,
        })
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The pair starting at `off`; `parse` checked its lengths.
    fn pair_at(&self, off: u64) -> (&[u8], &[u8]) {
        let mut buf = &self.data[off as usize..];
        let k = super::map::get_bytes(&mut buf).expect("checked by parse");
        let v = super::map::get_bytes(&mut buf).expect("checked by parse");
        (k, v)
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let (mut lo, mut hi) = (0, self.offsets.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (k, v) = self.pair_at(self.offsets.get(mid));
            match k.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(v),
            }
        }
        None
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        (0..self.offsets.len()).map(|i| self.pair_at(self.offsets.get(i)))
    }

    pub fn encoded_len(&self) -> usize {
        self.data.len()
    }

    /// Reads the pairs from `data` instead, the same bytes elsewhere (the caller knows they are,
    /// having written them), with the mapping they lie in.
    pub fn set_data(&mut self, data: Bytes, pages: Option<Pages>) {
        debug_assert_eq!(data.len(), self.data.len());
        self.data = data;
        self.pages = pages;
    }

    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        self.pages.is_some()
    }

    /// A pass over the map in key order has got as far as `value` (any slice: one outside the
    /// run says nothing). Once more than [`FORGET_EVERY`] bytes of a mapped run lie behind the
    /// pass, their pages are let go: a snapshot of a large map then holds a window of it, not
    /// the whole file. `behind` is the pass's own count of bytes let go.
    pub fn passed(&self, value: &[u8], behind: &mut usize) {
        let Some(pages) = &self.pages else { return };
        let Some(at) = (value.as_ptr() as usize).checked_sub(self.data.as_ptr() as usize) else {
            return;
        };
        let end = at + value.len();
        if end <= self.data.len() && end >= *behind + FORGET_EVERY {
            pages.forget(&self.data[*behind..end]);
            *behind = end;
        }
    }
}

/// Notes where each pair starts as the snapshot writer encodes the map (in ascending key
/// order), so that the file it wrote becomes the next base without being read: its pages stay
/// on disk, or in the page cache, until a GET needs them. Building the run in memory instead
/// held the map twice while the snapshot was written (the old base and the new), which was most
/// of a node's peak memory in the PUT benchmark.
pub struct RunBuilder {
    /// Bytes encoded so far, the pair count included.
    len: u64,
    offsets: Offsets,
}

impl RunBuilder {
    /// For a run of `encoded_len` bytes and `pairs` pairs: the offsets never reallocate.
    pub fn new(encoded_len: u64, pairs: usize) -> RunBuilder {
        RunBuilder {
            len: 8,
            offsets: Offsets::for_run(encoded_len, pairs),
        }
    }

    /// The next pair took `encoded` bytes (key length, key, value length, value).
    pub fn push(&mut self, encoded: usize) {
        self.offsets.push(self.len);
        self.len += encoded as u64;
    }

    /// The run over `data`, the bytes just written as the builder was told, or `None` if
    /// `data` is not as long as they were (it would not be those bytes). The pairs are not
    /// checked again: reading them would bring every page of a mapped file into memory.
    /// `pages` is the mapping `data` lies in, if it is one.
    pub fn finish(self, data: Bytes, pages: Option<Pages>) -> Option<Run> {
        let count = data.get(..8)?;
        (data.len() as u64 == self.len
            && u64::from_le_bytes(count.try_into().expect("8 bytes")) == self.offsets.len() as u64)
            .then_some(Run {
                data,
                offsets: self.offsets,
                pages,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut buf = (pairs.len() as u64).to_le_bytes().to_vec();
        for (k, v) in pairs {
            super::super::map::put_bytes(&mut buf, k).unwrap();
            super::super::map::put_bytes(&mut buf, v).unwrap();
        }
        buf
    }

    #[test]
    fn parse_finds_every_key_and_only_those() {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
            .map(|i| {
                (
                    format!("/k{i:05}").into_bytes(),
                    vec![i as u8; (i % 7) as usize],
                )
            })
            .collect();
        let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let run = Run::parse(encoded(&refs).into()).unwrap();
        assert_eq!(run.len(), 1000);
        for (k, v) in &refs {
            assert_eq!(run.get(k), Some(*v));
        }
        assert_eq!(run.get(b"/k"), None);
        assert_eq!(run.get(b"/k00000x"), None);
        assert_eq!(run.get(b"/z"), None);
        assert!(run.iter().eq(refs.iter().copied()));
    }

    /// A run of 4 GiB or more keeps 8-byte offsets, and reads the same.
    #[test]
    fn wide_offsets_read_the_same() {
        let refs: [(&[u8], &[u8]); 3] = [(b"/a", b"1"), (b"/b", b""), (b"/c", b"3")];
        let narrow = Run::parse(encoded(&refs).into()).unwrap();
        assert!(matches!(narrow.offsets, Offsets::Narrow(_)));
        assert!(matches!(Offsets::for_run(1 << 32, 0), Offsets::Wide(_)));
        let mut wide = Offsets::for_run(1 << 32, 3);
        for i in 0..3 {
            wide.push(narrow.offsets.get(i));
        }
        let run = Run {
            data: narrow.data.clone(),
            offsets: wide,
            pages: None,
        };
        assert!(run.iter().eq(refs.iter().copied()));
        assert_eq!(run.get(b"/b"), Some(&b""[..]));
        assert_eq!(run.get(b"/d"), None);
    }

    #[test]
    fn damaged_or_unsorted_input_is_refused() {
        let enc = encoded(&[(b"/a", b"1"), (b"/b", b"")]);
        for cut in 0..enc.len() {
            assert!(
                matches!(Run::parse(enc[..cut].to_vec().into()), Err(NotARun::Bad(_))),
                "prefix of {cut} bytes"
            );
        }
        let mut padded = enc.clone();
        padded.push(0);
        assert_eq!(
            Run::parse(padded.into()).unwrap_err(),
            NotARun::Bad(DecodeError::Trailing(1))
        );
        let unsorted = encoded(&[(b"/b", b"1"), (b"/a", b"")]);
        assert_eq!(Run::parse(unsorted.into()).unwrap_err(), NotARun::Unsorted);
        let dup = encoded(&[(b"/a", b"1"), (b"/a", b"2")]);
        assert_eq!(Run::parse(dup.into()).unwrap_err(), NotARun::Unsorted);
        let mut huge = encoded(&[]);
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Run::parse(huge.into()), Err(NotARun::Bad(_))));
    }

    #[test]
    fn builder_offsets_match_parsing() {
        let refs: [(&[u8], &[u8]); 3] = [(b"", b"e"), (b"/a", b"1"), (b"/b", b"")];
        let enc = encoded(&refs);
        let builder = || {
            let mut b = RunBuilder::new(enc.len() as u64, 3);
            for (k, v) in refs {
                b.push(16 + k.len() + v.len());
            }
            b
        };
        let built = builder().finish(enc.clone().into(), None).unwrap();
        let parsed = Run::parse(enc.clone().into()).unwrap();
        assert_eq!(built.offsets, parsed.offsets);
        assert!(built.iter().eq(refs.iter().copied()));
        // Bytes that cannot be what was written are refused.
        assert!(builder()
            .finish(enc[..enc.len() - 1].to_vec().into(), None)
            .is_none());
        assert!(builder().finish(Bytes::new(), None).is_none());
        let mut recount = enc.clone();
        recount[0] = 2;
        assert!(builder().finish(recount.into(), None).is_none());
    }
}
