//! Errors of the capture writer.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why writing a capture failed. Every variant that concerns a file names it.
#[derive(Debug)]
pub enum CaptureError {
    /// A symbolic link sits at the path of a capture file. Capture files are created with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW`, so a link is never followed (and never replaced).
    Symlink {
        /// The path of the link.
        path: PathBuf,
    },
    /// Something other than a regular file (a directory, a FIFO, ...) is at the path.
    NotAFile {
        /// The offending path.
        path: PathBuf,
    },
    /// The file system is full (`ENOSPC`) or the disk quota is exhausted (`EDQUOT`).
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
        /// `true`: the file was cut back to its last complete record and is readable;
        /// `false`: it was removed because not even its header fit.
        file_kept: bool,
    },
    /// Any other I/O error.
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done ("create", "write", "delete old", ...).
        action: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// An invalid rotation policy, snap length or file name pattern.
    InvalidConfig(String),
    /// [`write`](super::CaptureWriter::write) or [`add_lost`](super::CaptureWriter::add_lost)
    /// named a hop that was never added. Nothing was written.
    UnknownHop {
        /// The index given.
        index: usize,
        /// How many hops exist.
        hops: usize,
    },
    /// A packet cannot be represented in the file format (e.g. a classic pcap timestamp
    /// after 2106). Nothing was written; the writer stays usable.
    Encode {
        /// The file the packet was meant for.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// An earlier I/O error stopped the writer; every file written before it is complete.
    Stopped {
        /// The message of that first error.
        first_error: String,
    },
}

impl CaptureError {
    /// Classify an I/O error on `path`: `ENOSPC`/`EDQUOT` become [`CaptureError::DiskFull`].
    pub(crate) fn io(path: &std::path::Path, action: &'static str, source: io::Error) -> Self {
        if is_disk_full(&source) {
            CaptureError::DiskFull {
                path: path.to_path_buf(),
                source,
                file_kept: true,
            }
        } else {
            CaptureError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        }
    }

    /// Whether this is the disk-full case.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CaptureError::DiskFull { .. })
    }
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::Symlink { path } => write!(
                f,
                "refusing to write capture file {}: it is a symbolic link (remove it or choose another name)",
                path.display()
            ),
            CaptureError::NotAFile { path } => write!(
                f,
                "refusing to write capture file {}: it exists and is not a regular file",
                path.display()
            ),
            CaptureError::DiskFull {
                path,
                source,
                file_kept,
            } => {
                let what = if source.raw_os_error() == Some(libc::EDQUOT) {
                    "disk quota exceeded"
                } else {
                    "disk full (no space left on device)"
                };
                write!(f, "{what} while writing capture file {}: ", path.display())?;
                if *file_kept {
                    f.write_str("it was cut back to its last complete packet; earlier files are complete")
                } else {
                    f.write_str("it was removed as not even its header fit; earlier files are complete")
                }
            }
            CaptureError::Io {
                path,
                action,
                source,
            } => write!(f, "cannot {action} capture file {}: {source}", path.display()),
            CaptureError::InvalidConfig(msg) => f.write_str(msg),
            CaptureError::UnknownHop { index, hops } => {
                write!(f, "capture writer: unknown hop {index} (there are {hops} hops)")
            }
            CaptureError::Encode { path, detail } => {
                write!(f, "cannot store a packet in {}: {detail}", path.display())
            }
            CaptureError::Stopped { first_error } => {
                write!(f, "capture writer stopped after an earlier error: {first_error}")
            }
        }
    }
}

impl std::error::Error for CaptureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CaptureError::DiskFull { source, .. } | CaptureError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
