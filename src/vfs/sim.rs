//! A simulated disk for tests: a page cache over a durable image, and a power cut that keeps
//! what a real disk may keep. The fault model:
//!
//! * what was synced stays (`sync_data`/`sync_all` for a file's data and length, `sync_dir`
//!   for a directory's entries);
//! * of the pages written since a file's last sync, any subset of 4 KiB pages reached the
//!   disk, in any order; the rest read as what was there before (zeros past the old end);
//!   the length is the old or the new one;
//! * each directory entry created, renamed or removed since the directory's last sync is
//!   independently either the old or the new one.
//!
//! [`SimDisk::power_cut`] draws one such outcome from a seed and returns it as a new disk; the
//! old one fails every call from then on, so that the node running on it stops without
//! writing anything more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{VFile, Vfs};

/// The unit a power cut keeps or loses.
pub const PAGE: u64 = 4096;

#[derive(Debug, Default, Clone)]
struct Inode {
    /// What is on the platter.
    durable: Vec<u8>,
    /// What reads see: the page cache.
    current: Vec<u8>,
    /// Pages of `current` that differ from `durable`, by page number.
    dirty: BTreeSet<u64>,
}

impl Inode {
    fn touch(&mut self, from: u64, to: u64) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    fn sync(&mut self) {
        let len = self.current.len();
        self.durable.resize(len, 0);
        for p in std::mem::take(&mut self.dirty) {
            let lo = ((p * PAGE) as usize).min(len);
            let hi = (((p + 1) * PAGE) as usize).min(len);
            self.durable[lo..hi].copy_from_slice(&self.current[lo..hi]);
        }
    }

    /// One outcome of a power cut for this file.
    fn cut(&self, rng: &mut Rng) -> Vec<u8> {
        let len = if rng.coin() {
            self.current.len()
        } else {
            self.durable.len()
        };
        let mut img = self.durable.clone();
        img.resize(len, 0);
        for &p in &self.dirty {
            if !rng.coin() {
                continue;
            }
            let lo = ((p * PAGE) as usize).min(len);
            let hi = (((p + 1) * PAGE) as usize).min(len);
            for (i, b) in img[lo..hi].iter_mut().enumerate() {
                *b = self.current.get(lo + i).copied().unwrap_or(0);
            }
        }
        img
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    current: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
    /// Set by a power cut: every call fails.
    dead: bool,
    /// Syncs to let through before the power fails in the middle of one (see
    /// [`SimDisk::fail_at_sync`]).
    syncs_left: Option<u64>,
    /// Writes and syncs to let through before one fails with an I/O error (see
    /// [`SimDisk::fail_op`]).
    fault: Option<(u64, Fault)>,
}

/// An error one call fails with while the disk stays up, as a failing or full disk answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// EIO.
    Eio,
    /// ENOSPC.
    NoSpace,
}

impl State {
    /// One more write, or (if `sync`) sync of a file or directory: the call
    /// [`SimDisk::fail_op`] or [`SimDisk::fail_at_sync`] picked fails.
    fn count(&mut self, sync: bool) -> io::Result<()> {
        if let Some((n, f)) = self.fault {
            self.fault = n.checked_sub(1).map(|n| (n, f));
            if n == 0 {
                let errno = if f == Fault::Eio { 5 } else { 28 };
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        match self.syncs_left.filter(|_| sync) {
            Some(0) => {
                self.dead = true;
                Err(gone())
            }
            Some(n) => {
                self.syncs_left = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// The simulated disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

fn gone() -> io::Error {
    io::Error::other("simulated disk: the power was cut")
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", p.display()),
    )
}

/// splitmix64: small, seedable, good enough to draw outcomes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

impl SimDisk {
    /// A disk holding the directory `dir` (and its parents), durably.
    pub fn with_dir(dir: &Path) -> SimDisk {
        let disk = SimDisk::default();
        {
            let mut st = disk.lock();
            for a in dir.ancestors() {
                st.current.insert(a.to_path_buf(), Entry::Dir);
                st.durable.insert(a.to_path_buf(), Entry::Dir);
            }
        }
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .expect("a panic while holding the sim disk lock")
    }

    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.dead {
            Err(gone())
        } else {
            Ok(st)
        }
    }

    /// Cuts the power: this disk fails every call from now on, and the returned one holds
    /// what survived, drawn from `seed` under the fault model of the module docs.
    pub fn power_cut(&self, seed: u64) -> SimDisk {
        let mut st = self.lock();
        st.dead = true;
        let mut rng = Rng(seed);
        let names: BTreeSet<PathBuf> = st
            .current
            .keys()
            .chain(st.durable.keys())
            .cloned()
            .collect();
        let mut out = State::default();
        let mut images: HashMap<u64, u64> = HashMap::new();
        // Parents sort before their children, so a lost directory takes its entries along.
        for name in names {
            let (old, new) = (st.durable.get(&name), st.current.get(&name));
            let kept = if old == new || rng.coin() { new } else { old };
            let Some(&entry) = kept else { continue };
            let parent_ok = name
                .parent()
                .map_or(true, |p| out.current.get(p) == Some(&Entry::Dir));
            if !parent_ok {
                continue;
            }
            let entry = match entry {
                Entry::Dir => Entry::Dir,
                Entry::File(ino) => {
                    let new_ino = *images.entry(ino).or_insert_with(|| {
                        let img = st.inodes[&ino].cut(&mut rng);
                        out.next_ino += 1;
                        let inode = Inode {
                            durable: img.clone(),
                            current: img,
                            dirty: BTreeSet::new(),
                        };
                        out.inodes.insert(out.next_ino, inode);
                        out.next_ino
                    });
                    Entry::File(new_ino)
                }
            };
            out.current.insert(name.clone(), entry);
            out.durable.insert(name, entry);
        }
        SimDisk(Arc::new(Mutex::new(out)))
    }

    /// Lets `n` more syncs (of files or directories) through, then fails the power during the
    /// next one: what it was to make durable stays unsynced, and every call fails from then on (see
    /// [`SimDisk::is_dead`]). A cut at a random instant mostly finds nothing unsynced, since
    /// a simulated sync takes no time; this one lands where a torn write can happen.
    pub fn fail_at_sync(&self, n: u64) {
        self.lock().syncs_left = Some(n);
    }

    /// Lets `n` more writes and syncs through, then fails the next one with `fault`; the disk
    /// stays up, and what that call was to write or sync is not written or synced.
    pub fn fail_op(&self, n: u64, fault: Fault) {
        self.lock().fault = Some((n, fault));
    }

    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Flips one bit of a file's synced content, as a damaged disk would.
    pub fn flip_bit(&self, path: &Path, offset: u64) -> io::Result<()> {
        let mut st = self.live()?;
        let Some(&Entry::File(ino)) = st.current.get(path) else {
            return Err(not_found(path));
        };
        let inode = st.inodes.get_mut(&ino).expect("entries name live inodes");
        let i = offset as usize;
        if i >= inode.current.len() {
            return Err(io::Error::other("offset past the end of the file"));
        }
        inode.current[i] ^= 1;
        if i < inode.durable.len() {
            inode.durable[i] ^= 1;
        }
        Ok(())
    }

    /// The files under `dir` with the length of their synced content, by name.
    pub fn synced_files(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        let st = self.lock();
        st.durable
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .filter_map(|(p, e)| match e {
                Entry::File(ino) => Some((p.clone(), st.inodes[ino].durable.len() as u64)),
                Entry::Dir => None,
            })
            .filter(|(_, len)| *len > 0)
            .collect()
    }

    /// Bytes written but not synced, over every file: what a power cut may lose.
    pub fn unsynced_pages(&self) -> usize {
        self.lock().inodes.values().map(|i| i.dirty.len()).sum()
    }
}

#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut st = self.disk.live()?;
        let inode = st
            .inodes
            .get_mut(&self.ino)
            .expect("open files keep their inode");
        Ok(f(inode))
    }
}

impl SimFile {
    fn sync(&mut self) -> io::Result<()> {
        let mut st = self.disk.live()?;
        st.count(true)?;
        st.inodes
            .get_mut(&self.ino)
            .expect("open files keep their inode")
            .sync();
        Ok(())
    }
}

impl VFile for SimFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.live()?.count(false)?;
        self.with(|i| {
            let (lo, hi) = (offset as usize, offset as usize + buf.len());
            let old_len = i.current.len();
            if hi > old_len {
                i.current.resize(hi, 0);
                // A gap is zeros the file now has, as unsynced as the data after it.
                i.touch(old_len as u64, offset);
            }
            i.current[lo..hi].copy_from_slice(buf);
            i.touch(offset, hi as u64);
        })
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|i| {
            let old = i.current.len() as u64;
            i.current.resize(len as usize, 0);
            i.touch(old.min(len), old.max(len));
        })
    }
    fn size(&self) -> io::Result<u64> {
        self.with(|i| i.current.len() as u64)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.sync()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.sync()
    }
}

fn has_dir(st: &State, p: &Path) -> bool {
    st.current.get(p) == Some(&Entry::Dir)
}

fn parent_dir(st: &State, p: &Path) -> io::Result<()> {
    match p.parent() {
        Some(d) if has_dir(st, d) => Ok(()),
        _ => Err(not_found(p)),
    }
}

impl Vfs for SimDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let mut st = self.live()?;
        parent_dir(&st, path)?;
        let ino = match st.current.get(path) {
            Some(Entry::File(ino)) => {
                let ino = *ino;
                let i = st.inodes.get_mut(&ino).expect("entries name live inodes");
                let old = i.current.len() as u64;
                i.current.clear();
                i.touch(0, old);
                ino
            }
            Some(Entry::Dir) => return Err(io::Error::other("is a directory")),
            None => {
                st.next_ino += 1;
                let ino = st.next_ino;
                st.inodes.insert(ino, Inode::default());
                st.current.insert(path.to_path_buf(), Entry::File(ino));
                ino
            }
        };
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let st = self.live()?;
        match st.current.get(path) {
            Some(&Entry::File(ino)) => Ok(Box::new(SimFile {
                disk: self.clone(),
                ino,
            })),
            _ => Err(not_found(path)),
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.live()?;
        match st.current.get(path) {
            Some(Entry::File(ino)) => Ok(st.inodes[ino].current.clone()),
            _ => Err(not_found(path)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        parent_dir(&st, to)?;
        let entry = st.current.remove(from).ok_or_else(|| not_found(from))?;
        st.current.insert(to.to_path_buf(), entry);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        match st.current.get(path) {
            Some(Entry::File(_)) => {
                st.current.remove(path);
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.live()?;
        if !has_dir(&st, dir) {
            return Err(not_found(dir));
        }
        Ok(st
            .current
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        for a in dir.ancestors() {
            match st.current.get(a) {
                Some(Entry::Dir) => break,
                Some(Entry::File(_)) => return Err(io::Error::other("not a directory")),
                None => {
                    st.current.insert(a.to_path_buf(), Entry::Dir);
                }
            }
        }
        Ok(())
    }

    fn is_dir(&self, dir: &Path) -> bool {
        self.live().is_ok_and(|st| has_dir(&st, dir))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        st.count(true)?;
        if !has_dir(&st, dir) {
            return Err(not_found(dir));
        }
        let st = &mut *st;
        let names: BTreeSet<PathBuf> = st
            .current
            .keys()
            .chain(st.durable.keys())
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        for name in names {
            match st.current.get(&name) {
                Some(&e) => st.durable.insert(name, e),
                None => st.durable.remove(&name),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(d: &SimDisk, p: &Path, data: &[u8], sync: bool) {
        let mut f = d.create(p).unwrap();
        f.write_at(data, 0).unwrap();
        if sync {
            f.sync_all().unwrap();
        }
    }

    #[test]
    fn synced_data_and_entries_survive_every_cut() {
        let root = Path::new("/d");
        let d = SimDisk::with_dir(root);
        let data: Vec<u8> = (0..3 * PAGE as usize).map(|i| i as u8).collect();
        write(&d, &root.join("a"), &data, true);
        d.sync_dir(root).unwrap();
        for seed in 0..32 {
            let after = d.clone().power_cut(seed);
            assert_eq!(after.read(&root.join("a")).unwrap(), data);
        }
    }

    /// Unsynced pages come back old or new, page by page, each outcome reachable.
    #[test]
    fn unsynced_pages_are_kept_or_lost_independently() {
        let root = Path::new("/d");
        let d = SimDisk::with_dir(root);
        let p = root.join("a");
        write(&d, &p, &vec![1; 2 * PAGE as usize], true);
        d.sync_dir(root).unwrap();
        let mut f = d.open(&p).unwrap();
        f.write_at(&vec![2; 2 * PAGE as usize], 0).unwrap();
        let mut seen = BTreeSet::new();
        for seed in 0..64 {
            let img = d.power_cut(seed).read(&p).unwrap();
            seen.insert((img[0], img[PAGE as usize]));
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        // The cut disk is gone for the node that ran on it.
        assert!(f.write_at(b"x", 0).is_err());
    }

    #[test]
    fn a_rename_without_dir_sync_may_vanish() {
        let root = Path::new("/d");
        let renamed = |dir_sync: bool| {
            let d = SimDisk::with_dir(root);
            write(&d, &root.join("t"), b"x", true);
            d.rename(&root.join("t"), &root.join("f")).unwrap();
            if dir_sync {
                d.sync_dir(root).unwrap();
            }
            (0..32)
                .map(|s| d.power_cut(s).read(&root.join("f")).is_ok())
                .collect::<BTreeSet<bool>>()
        };
        assert_eq!(renamed(false).len(), 2);
        assert_eq!(renamed(true), BTreeSet::from([true]));
    }
}
