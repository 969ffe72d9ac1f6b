//! What a long-running podtrace keeps resident. Much of it is file pages: the kernel maps a
//! file's pages around each one a process touches (`fault_around_bytes`, 64 KiB), so the
//! scattered code run once (arguments, TLS set-up, the runtime; resolving, loading and
//! attaching) leaves ~10 MiB of the 30 MiB binary mapped, which a session that waits for
//! packets does not use. The heap grows while the kernel's BTF is parsed.
//!
//! [`settle`] unmaps the clean file pages (they stay in the page cache, shared with every
//! other podtrace process, and come back on the next touch as minor faults) and gives the
//! heap's free memory back. A session unmaps the file pages before it loads its probes (the
//! code that resolved the path is done; loading is when memory peaks, with the parsed BTF),
//! and settles once everything is attached, before it maps its event ring buffer (which
//! counts twice its size: the kernel maps its pages twice, so that a record that wraps
//! around reads as one). An agent settles when it starts listening and whenever its last
//! session ends.
//!
//! glibc gives each thread that allocates an arena of its own, and a session's threads (the
//! loaders, the blocking pool) leave their arenas fragmented: an agent kept ~3 MiB more per
//! session that no trim returned (43 MiB after 12 sessions). [`one_heap`] keeps the agent on
//! one arena (its threads rarely allocate at the same time): ~7 MiB after any number.
use std::fs;

/// The mappings that hold only a file's bytes: private, not writable, no page of their own
/// (`Anonymous: 0 kB`: relocated read-only data has some, and is left alone).
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // A mapping's header: range, perms, offset, dev, inode, path.
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            current = match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(a), Ok(b))
                    if path.starts_with('/')
                        && perms.starts_with('r')
                        && perms.ends_with('p')
                        && !perms.contains('w') =>
                {
                    Some((a, b))
                }
                _ => None,
            };
        } else if first == "Anonymous:" {
            if let Some(range) = current.take() {
                if fields.next() == Some("0") {
                    out.push(range);
                }
            }
        }
    }
    out
}

/// One malloc arena for the whole process (see the module); call before any thread starts.
pub fn one_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: plain C library call, before the process's threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Lets go of the clean file pages and the heap's free memory (see the module). Best
/// effort: a kernel or a C library that refuses changes nothing but the resident size.
pub fn settle() {
    unmap_clean_file_pages();
    #[cfg(target_env = "gnu")]
    // SAFETY: plain C library call.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmaps the clean file pages (see the module); ~0.2 ms. Best effort.
pub fn unmap_clean_file_pages() {
    if let Ok(smaps) = fs::read_to_string("/proc/self/smaps") {
        for (start, end) in clean_file_mappings(&smaps) {
            // SAFETY: whole private mappings of files that are not writable and hold no page
            // of their own: unmapping their pages loses nothing, the next touch maps them
            // again from the page cache.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_private_read_only_file_mappings() {
        let smaps = "\
55d0c0000000-55d0c0400000 r--p 00000000 fe:01 123 /usr/bin/podtrace
Size:               4096 kB
Anonymous:             0 kB
55d0c0400000-55d0c1400000 r-xp 00400000 fe:01 123 /usr/bin/podtrace
Size:              16384 kB
Anonymous:             0 kB
55d0c1400000-55d0c1500000 r--p 01400000 fe:01 123 /usr/bin/podtrace
Size:               1024 kB
Anonymous:           812 kB
55d0c1500000-55d0c1510000 rw-p 01500000 fe:01 123 /usr/bin/podtrace
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
Anonymous:          1024 kB
7f0000400000-7f0000500000 r--s 00000000 00:05 77 /dev/shm/x
Anonymous:             0 kB
";
        assert_eq!(
            clean_file_mappings(smaps),
            vec![
                (0x55d0c0000000, 0x55d0c0400000),
                (0x55d0c0400000, 0x55d0c1400000),
                (0x7f0000000000, 0x7f0000100000)
            ]
        );
    }
}
