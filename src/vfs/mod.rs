//! The file-system interface under the WAL and the snapshot files: the handful of calls they
//! make (create, write at, read, sync data, sync all, rename, remove, list, sync dir), so that
//! the daemon runs them on the OS and the tests on a simulated disk ([`sim`]) that loses unsynced writes the way a power cut does.
//!
//! No channels: a [`Disk`] is a cheap handle, cloned into whoever writes files.

#[doc(hidden)]
pub mod sim;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

/// A file open for writing.
pub trait VFile: Send + fmt::Debug {
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// fdatasync: the data and the length, not the other metadata.
    fn sync_data(&mut self) -> io::Result<()>;
    fn sync_all(&mut self) -> io::Result<()>;
}

/// Files at least this large are mapped by [`Vfs::read_shared`] rather than read.
const MAP_ABOVE: u64 = 1 << 20;

/// The calls the WAL and the snapshotter make on a file system.
pub trait Vfs: Send + Sync + fmt::Debug {
    /// Creates `path` (or truncates it) for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    /// Opens an existing file for writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The contents of a file, shared rather than copied where the file system allows (mapped).
    /// The caller must never keep bytes that are later changed or cut off: a snapshot is never
    /// written again once renamed into place; a WAL segment is only appended to after its last
    /// record, or cut after it (a torn tail), and only its records are kept.
    fn read_shared(&self, path: &Path) -> io::Result<Bytes> {
        self.read(path).map(Bytes::from)
    }
    /// [`Vfs::read_shared`] for a file just written whose pages the caller does not read now:
    /// where it is mapped, a page comes into memory only when read, and the [`Pages`] returned
    /// can let it go again.
    fn map_unread(&self, path: &Path) -> io::Result<(Bytes, Option<Pages>)> {
        self.read_shared(path).map(|b| (b, None))
    }
    /// Atomically replaces `to` with `from` (durable only after [`Vfs::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `dir` and its missing parents, mode 0750.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    fn is_dir(&self, dir: &Path) -> bool;
    /// Makes the creations, renames and removals of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A read-only shared mapping of a file that is never written again (see [`Vfs::read_shared`]).
#[derive(Clone, Debug)]
pub struct Pages(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for Pages {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Pages {
    /// Lets the process's page table drop the pages lying wholly within `part` (bytes of this
    /// mapping; anything outside it is ignored). They stay the file's page cache, clean, which
    /// the kernel keeps or evicts as memory allows, and reading them again maps them again:
    /// a pass over a large mapped file need not hold all of it in the process's memory.
    pub fn forget(&self, part: &[u8]) {
        const PAGE: usize = 4096;
        let map = self.0.as_ptr() as usize;
        let start = (part.as_ptr() as usize).max(map);
        let end = (part.as_ptr() as usize + part.len()).min(map + self.0.len());
        // Whole pages only: the mapping starts on a page boundary, so offsets align as
        // addresses do.
        let (from, to) = (
            (start - map).div_ceil(PAGE) * PAGE,
            (end.max(start) - map) / PAGE * PAGE,
        );
        if from < to {
            // SAFETY: MADV_DONTNEED on a shared file mapping only drops page-table entries: a
            // later access reads the same bytes from the file, which no one writes (see
            // `Vfs::read_shared`), so every borrowed slice keeps reading what it did. A failure
            // leaves the pages mapped, which costs memory only.
            let _ = unsafe {
                self.0
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }
}

/// A file's contents: read if small, else mapped, its pages faulted in now if `populate`.
fn os_map(path: &Path, populate: bool) -> io::Result<(Bytes, Option<Pages>)> {
    let file = fs::File::open(path)?;
    if file.metadata()?.len() < MAP_ABOVE {
        return Ok((fs::read(path)?.into(), None));
    }
    let mut opts = memmap2::MmapOptions::new();
    if populate {
        opts.populate();
    }
    // Mapped, the file's pages come straight from the page cache: reading it instead copied
    // it into fresh memory that the kernel first zeroed, half of a large restart's CPU.
    // SAFETY: per the contract of `Vfs::read_shared`, no byte the caller keeps is written or
    // cut off later; deleting the file leaves the mapping valid.
    let pages = Pages(Arc::new(unsafe { opts.map(&file)? }));
    Ok((Bytes::from_owner(pages.clone()), Some(pages)))
}

/// The disk the WAL and snapshots live on: the OS unless a test hands in another.
#[derive(Clone, Debug)]
pub struct Disk(Arc<dyn Vfs>);

impl Default for Disk {
    fn default() -> Self {
        Disk(Arc::new(Os))
    }
}

impl std::ops::Deref for Disk {
    type Target = dyn Vfs;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Disk {
    pub fn new(vfs: Arc<dyn Vfs>) -> Disk {
        Disk(vfs)
    }

    /// Creates `dir` if missing and makes its entry in the parent durable: without that a
    /// crash could lose the directory, and with it files the rest of the store relies on.
    pub fn create_dir_durable(&self, dir: &Path) -> io::Result<()> {
        if self.is_dir(dir) {
            return Ok(());
        }
        self.create_dir_all(dir)?;
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.sync_dir(p),
            _ => self.sync_dir(Path::new(".")),
        }
    }
}

/// The real file system.
#[derive(Debug)]
pub struct Os;

#[derive(Debug)]
struct OsFile(File);

impl VFile for OsFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Vfs for Os {
    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(OsFile(f)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        Ok(Box::new(OsFile(OpenOptions::new().write(true).open(path)?)))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn read_shared(&self, path: &Path) -> io::Result<Bytes> {
        os_map(path, true).map(|(bytes, _)| bytes)
    }
    fn map_unread(&self, path: &Path) -> io::Result<(Bytes, Option<Pages>)> {
        os_map(path, false)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for ent in fs::read_dir(dir)? {
            // A name that is not UTF-8 is no file of ours.
            if let Ok(name) = ent?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o750);
        b.create(dir)
    }
    fn is_dir(&self, dir: &Path) -> bool {
        dir.is_dir()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A [`VFile`] as a sequential `Write`r, for streaming a snapshot file.
pub struct Appender {
    pub file: Box<dyn VFile>,
    pub offset: u64,
}

impl io::Write for Appender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_at(buf, self.offset)?;
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
