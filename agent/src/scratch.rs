//! Where a restore's checked snapshot waits for etcd's restore tool, which reads it once, by path, copies it
//! into the new data dir and is done with it.
//!
//! In memory when it fits: an anonymous file (`memfd`) the tool opens through `/proc/<agent>/fd/<n>`. It
//! never reaches the disk, and it is gone when the agent exits however it exits. On disk otherwise, as a
//! hidden file inside the data dir (a hostPath mount in a static pod: the only place known to be writable
//! and large enough), removed afterwards. Freeing a multi-GB file is slow on a disk mounted with `discard`
//! (about 1.2 s per GB here, on the critical path of the restore, see docs/PERFORMANCE.md); dropping the
//! memory copy takes a fraction of a second, and etcd, which is stopped during a restore, will need that
//! much memory for its database anyway.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing::{info, warn};

/// A disk copy's name in the data dir: `.ferry-restore-<unix seconds>.db`.
const DISK_PREFIX: &str = ".ferry-restore-";

/// Removes the disk copies a killed restore left in `data_dir` (a failed one removes its own): several GB
/// each, and never anything but a scratch copy.
pub fn remove_stale(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stamp = name.strip_prefix(DISK_PREFIX).and_then(|n| n.strip_suffix(".db"));
        if !stamp.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        // A file, not a link or a directory someone put there.
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                warn!(path = %entry.path().display(), bytes = meta.len(), "removed a scratch copy that a killed restore left behind")
            }
            Err(e) => {
                warn!(path = %entry.path().display(), "cannot remove a scratch copy a killed restore left behind: {e}")
            }
        }
    }
}

/// `ferry-agent restore --scratch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScratchChoice {
    /// Memory when the snapshot takes at most half the memory available to the agent, else disk.
    #[default]
    Auto,
    /// Always memory (fails if it cannot be had; the kernel may OOM-kill the restore if it over-commits).
    Memory,
    /// Always a hidden file in the data dir.
    Disk,
}

/// The snapshot's scratch copy; the file (and a disk copy's name) goes when this is dropped.
pub struct Scratch {
    file: File,
    /// What etcd's tool opens.
    path: PathBuf,
    on_disk: bool,
}

impl Scratch {
    /// A scratch copy for a snapshot of `rawsize` bytes restoring into `data_dir`.
    pub fn open(choice: ScratchChoice, rawsize: u64, data_dir: &Path, stamp: u64) -> Result<Self> {
        let room = memory_headroom();
        let memory = match choice {
            ScratchChoice::Disk => false,
            ScratchChoice::Memory => true,
            ScratchChoice::Auto => room.is_some_and(|room| fits_in_memory(rawsize, room)),
        };
        if memory {
            match Self::memory() {
                Ok(s) => {
                    info!(rawsize, available = room, "the checked snapshot waits in memory for etcd's restore tool");
                    return Ok(s);
                }
                Err(e) if choice == ScratchChoice::Memory => return Err(e),
                Err(e) => warn!("{e:#}; the snapshot goes to disk instead"),
            }
        }
        let s = Self::disk(&data_dir.join(format!("{DISK_PREFIX}{stamp}.db")))?;
        info!(
            rawsize,
            available = room,
            path = %s.path.display(),
            why = match (choice, memory) {
                (ScratchChoice::Disk, _) => "--scratch disk",
                (_, true) => "no in-memory file to be had",
                _ => "it needs more than half the memory available",
            },
            "the checked snapshot waits on disk for etcd's restore tool"
        );
        Ok(s)
    }

    fn memory() -> Result<Self> {
        let fd = rustix::fs::memfd_create("ferry-restore-snapshot", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)
            .context("--scratch memory: create an in-memory file (memfd_create)")?;
        let file = File::from(fd);
        // etcd's tool is another process: it opens the file through this one's /proc entry, which the kernel
        // hands to root only when this process is not dumpable (file capabilities, setuid).
        if rustix::process::dumpable_behavior().ok() != Some(rustix::process::DumpableBehavior::Dumpable) {
            anyhow::bail!("--scratch memory: the agent is not dumpable, so etcd's tool could not open its /proc entry");
        }
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), std::os::fd::AsRawFd::as_raw_fd(&file)));
        File::open(&path).with_context(|| {
            format!("--scratch memory: open the in-memory file as {} (is /proc mounted?)", path.display())
        })?;
        Ok(Self { file, path, on_disk: false })
    }

    fn disk(path: &Path) -> Result<Self> {
        // A stale one from a crashed run goes; never through a link planted at the path.
        let file = ferry_common::config::create_private_replacing(path)
            .with_context(|| format!("create the restore's scratch file {}", path.display()))?;
        Ok(Self { file, path: path.to_path_buf(), on_disk: true })
    }

    /// The file to write the snapshot into (a second handle; this one stays open).
    pub fn writer(&self) -> Result<File> {
        self.file.try_clone().with_context(|| format!("reopen {}", self.path.display()))
    }

    /// The path etcd's tool reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.on_disk {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Half the headroom: the rest is for etcd's tool, whose copy fills the page cache as it writes.
fn fits_in_memory(rawsize: u64, headroom: u64) -> bool {
    rawsize <= headroom / 2
}

/// The memory this process may still use: the kernel's `MemAvailable`, and below it the room left under
/// every memory limit of its cgroup (a container's limit).
fn memory_headroom() -> Option<u64> {
    let available = parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Some(cgroup_limits(Path::new("/sys/fs/cgroup"), &cgroups).into_iter().fold(available, u64::min))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The room under each memory limit of this process's cgroup and its ancestors, v2 or v1. A container
/// sees its own cgroup at the mount's root, whatever `/proc/self/cgroup` names, so the walk ends there.
/// Unreadable or unlimited ones count as no limit.
fn cgroup_limits(sys_fs_cgroup: &Path, proc_self_cgroup: &str) -> Vec<u64> {
    let room = |limit: PathBuf, usage: PathBuf| -> Option<u64> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        Some(read(limit)?.saturating_sub(read(usage)?))
    };
    let mut out = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (root, limit, usage) = if controllers.is_empty() {
            (sys_fs_cgroup.to_path_buf(), "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (sys_fs_cgroup.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        } else {
            continue;
        };
        let mut dir = root.join(path.trim_start_matches('/'));
        loop {
            // v2's "max" does not parse: no limit at that level.
            out.extend(room(dir.join(limit), dir.join(usage)));
            if dir == root || !dir.pop() {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_only_when_the_snapshot_takes_at_most_half_the_room() {
        assert!(fits_in_memory(4 << 30, 8 << 30));
        assert!(!fits_in_memory((4 << 30) + 1, 8 << 30));
        // The restore init container's 256 MiB limit: small databases only.
        assert!(fits_in_memory(100 << 20, 230 << 20));
        assert!(!fits_in_memory(200 << 20, 230 << 20));
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       24598196 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(22_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn cgroup_limits_count_every_level_and_the_mount_root() {
        let sys = tempfile::tempdir().unwrap();
        let write = |dir: &str, files: &[(&str, &str)]| {
            let d = sys.path().join(dir);
            std::fs::create_dir_all(&d).unwrap();
            for (name, text) in files {
                std::fs::write(d.join(name), text).unwrap();
            }
        };
        // v2: the service's own limit and its slice's; "max" at the pod level is no limit.
        write("system.slice", &[("memory.max", "8000\n"), ("memory.current", "1000\n")]);
        write("system.slice/ferry.service", &[("memory.max", "3000\n"), ("memory.current", "500\n")]);
        write("system.slice/ferry.service/inner", &[("memory.max", "max\n"), ("memory.current", "400\n")]);
        let mut got = cgroup_limits(sys.path(), "0::/system.slice/ferry.service/inner\n");
        got.sort_unstable();
        assert_eq!(got, [2500, 7000]);
        // A container sees its own cgroup at the mount's root, whatever /proc/self/cgroup names.
        write("memory", &[("memory.limit_in_bytes", "268435456"), ("memory.usage_in_bytes", "67108864")]);
        assert_eq!(cgroup_limits(sys.path(), "4:memory:/kubepods/pod1/abc\n3:cpu:/x\n"), [(256 - 64) << 20]);
        assert!(cgroup_limits(sys.path(), "3:cpu:/x\ngarbage").is_empty());
    }

    #[test]
    fn stale_disk_copies_go_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let keep =
            [".ferry-restored", ".ferry-restore-.db", ".ferry-restore-12x.db", "member", ".ferry-restore-7.db.d"];
        for name in keep.iter().take(3) {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("member")).unwrap();
        std::fs::create_dir(dir.path().join(".ferry-restore-7.db.d")).unwrap();
        std::fs::create_dir(dir.path().join(".ferry-restore-8.db")).unwrap();
        std::fs::write(dir.path().join(".ferry-restore-1795323509.db"), b"stale").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(".ferry-restore-9.db")).unwrap();
        remove_stale(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        want.extend([".ferry-restore-8.db".to_string(), ".ferry-restore-9.db".to_string()]);
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn memory_scratch_is_readable_by_path_and_disk_scratch_is_removed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mem = Scratch::open(ScratchChoice::Memory, 10, dir.path(), 1).unwrap();
        mem.writer().unwrap().write_all(b"snapshot").unwrap();
        assert_eq!(std::fs::read(mem.path()).unwrap(), b"snapshot");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing on disk");
        let disk = Scratch::open(ScratchChoice::Disk, 10, dir.path(), 1).unwrap();
        disk.writer().unwrap().write_all(b"snapshot").unwrap();
        assert_eq!(std::fs::read(disk.path()).unwrap(), b"snapshot");
        let path = disk.path().to_path_buf();
        drop(disk);
        assert!(!path.exists());
    }
}
