//! The guest's root filesystem: an uncompressed cpio (newc) archive the kernel unpacks into
//! its rootfs. It holds the guest agent as /init, the static podtrace, host binaries the
//! steps run (ping, iptables, tc, nsenter, ip) with the shared libraries they load, and the
//! kernel modules the lab needs, decompressed, with the order to load them in.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

/// An archive being assembled: paths (without the leading `/`) to entries.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

fn key(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_owned()
}

impl Archive {
    pub fn dir(&mut self, path: &str) {
        let mut p = PathBuf::new();
        for c in Path::new(path.trim_start_matches('/')).components() {
            p.push(c);
            self.entries.entry(key(&p)).or_insert(Entry::Dir);
        }
    }

    fn parent_dirs(&mut self, path: &str) {
        if let Some(parent) = Path::new(path.trim_start_matches('/')).parent() {
            if !parent.as_os_str().is_empty() {
                self.dir(&parent.to_string_lossy());
            }
        }
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent_dirs(path);
        self.entries
            .insert(key(Path::new(path)), Entry::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent_dirs(path);
        self.entries
            .insert(key(Path::new(path)), Entry::Symlink(target.to_owned()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.parent_dirs(path);
        self.entries
            .insert(key(Path::new(path)), Entry::CharDev { major, minor });
    }

    /// Copies a host file to the same path in the archive, recreating every symlink met on
    /// the way (`/lib64/ld-linux-x86-64.so.2` → `/usr/lib64/...` → `/usr/lib/x86_64-linux-gnu/...`),
    /// so the guest resolves it exactly as the host does.
    pub fn host_path(&mut self, path: &Path) -> Result<()> {
        self.host_path_depth(path, 0)
    }

    fn host_path_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        if depth > 16 {
            bail!("too many symlinks resolving {}", path.display());
        }
        let mut cur = PathBuf::from("/");
        let comps: Vec<Component> = path.components().collect();
        for (i, c) in comps.iter().enumerate() {
            match c {
                Component::RootDir => continue,
                Component::Normal(n) => cur.push(n),
                _ => bail!("unexpected path {}", path.display()),
            }
            let meta = fs::symlink_metadata(&cur).with_context(|| cur.display().to_string())?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&cur)?;
                self.symlink(&cur.to_string_lossy(), &target.to_string_lossy());
                let resolved = if target.is_absolute() {
                    target
                } else {
                    cur.parent().unwrap_or(Path::new("/")).join(target)
                };
                let mut rest = normalize(&resolved);
                for c in &comps[i + 1..] {
                    rest.push(c);
                }
                return self.host_path_depth(&rest, depth + 1);
            }
            if i + 1 == comps.len() {
                if meta.is_dir() {
                    self.dir(&cur.to_string_lossy());
                } else {
                    let data = fs::read(&cur).with_context(|| cur.display().to_string())?;
                    self.file(
                        &cur.to_string_lossy(),
                        data,
                        meta.permissions().mode() & 0o7777,
                    );
                }
            }
        }
        Ok(())
    }

    /// A host binary and every shared library `ldd` says it loads.
    pub fn host_binary(&mut self, path: &Path) -> Result<()> {
        self.host_path(path)?;
        for lib in shared_libraries(path)? {
            self.host_path(&lib)?;
        }
        Ok(())
    }

    /// The archive in cpio newc format.
    pub fn write(&self, out: &mut impl std::io::Write) -> Result<()> {
        let mut ino = 1u32;
        for (path, entry) in &self.entries {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, &[], (*major, *minor)),
            };
            write_entry(out, ino, path, mode, data, rdev)?;
            ino += 1;
        }
        write_entry(out, ino, "TRAILER!!!", 0, &[], (0, 0))?;
        Ok(())
    }
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn write_entry(
    out: &mut impl std::io::Write,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0,
        0,
        if mode & 0o170000 == 0o040000 { 2 } else { 1 },
        0,
        data.len(),
        0,
        0,
        rdev.0,
        rdev.1,
        0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + namesize)?;
    out.write_all(data)?;
    pad(out, data.len())?;
    Ok(())
}

fn pad(out: &mut impl std::io::Write, len: usize) -> Result<()> {
    let n = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..n])?;
    Ok(())
}

/// The libraries `ldd` lists for a binary (absolute paths), the dynamic loader included.
fn shared_libraries(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
        let candidate = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(c) = candidate.filter(|c| c.starts_with('/')) {
            libs.push(PathBuf::from(c));
        }
    }
    Ok(libs)
}

/// Module name as the kernel writes it (`-` and `_` are the same).
fn module_name(file: &str) -> String {
    let stem = file
        .trim_end_matches(".xz")
        .trim_end_matches(".zst")
        .trim_end_matches(".gz")
        .trim_end_matches(".ko");
    stem.replace('-', "_")
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, out)?;
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".ko") {
                out.insert(module_name(&name), path);
            }
        }
    }
    Ok(())
}

/// A module file's bytes, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` list of a module's `.modinfo` section (ELF64 little-endian).
fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>> {
    let u16_at = |o: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(o..o + 2)
                .ok_or_else(|| anyhow!("truncated ELF"))?
                .try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            elf.get(o..o + 4)
                .ok_or_else(|| anyhow!("truncated ELF"))?
                .try_into()?,
        ))
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8)
                .ok_or_else(|| anyhow!("truncated ELF"))?
                .try_into()?,
        ))
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        bail!("not an ELF64 file");
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Result<(u32, usize, usize)> {
        let base = shoff + i * shentsize;
        Ok((
            u32_at(base)?,
            u64_at(base + 24)? as usize,
            u64_at(base + 32)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf
        .get(stroff..stroff + strsize)
        .ok_or_else(|| anyhow!("bad section name table"))?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = &strtab[name as usize..];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if &name[..end] != b".modinfo" {
            continue;
        }
        let data = elf
            .get(off..off + size)
            .ok_or_else(|| anyhow!("bad .modinfo"))?;
        for field in data.split(|&b| b == 0) {
            if let Some(deps) = field.strip_prefix(b"depends=") {
                return Ok(String::from_utf8_lossy(deps)
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_"))
                    .collect());
            }
        }
        return Ok(Vec::new());
    }
    bail!("no .modinfo section")
}

/// Adds the modules `wanted` (and what they depend on) under /kmod/ and writes
/// /modules.load, one file per line in the order to load them (dependencies first).
/// Modules the kernel has built in are skipped; a wanted module that is neither is an error.
pub fn add_modules(archive: &mut Archive, tree: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let builtin: BTreeSet<String> = fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(module_name)
        .collect();
    let mut files = BTreeMap::new();
    index_modules(&tree.join("kernel"), &mut files)?;
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        loaded: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        archive: &mut Archive,
        depth: u32,
    ) -> Result<()> {
        if loaded.contains(name) || builtin.contains(name) || depth > 32 {
            return Ok(());
        }
        let path = files
            .get(name)
            .ok_or_else(|| anyhow!("kernel module {name} is neither built in nor in the tree"))?;
        let bytes = module_bytes(path)?;
        let depends =
            modinfo_depends(&bytes).with_context(|| format!("reading {}", path.display()))?;
        loaded.insert(name.to_owned());
        for d in &depends {
            visit(d, files, builtin, loaded, order, archive, depth + 1)?;
        }
        let guest = format!("/kmod/{name}.ko");
        archive.file(&guest, bytes, 0o644);
        order.push(guest);
        Ok(())
    }
    for w in wanted {
        visit(w, &files, &builtin, &mut loaded, &mut order, archive, 0)?;
    }
    archive.file("/modules.load", order.join("\n").into_bytes(), 0o644);
    Ok(order)
}

/// Writes the archive to `path`.
pub fn write_to(archive: &Archive, path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    archive.write(&mut f)?;
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise() {
        assert_eq!(module_name("ip6_udp_tunnel.ko.xz"), "ip6_udp_tunnel");
        assert_eq!(module_name("nf-conntrack.ko"), "nf_conntrack");
    }

    #[test]
    fn newc_layout() {
        let mut a = Archive::default();
        a.file("/a/b", b"xyz".to_vec(), 0o755);
        let mut out = Vec::new();
        a.write(&mut out).unwrap();
        // "a" (dir), "a/b" (file), trailer; every header starts 4-aligned.
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 3);
        assert_eq!(out.len() % 4, 0);
        let file_header = text.find("a/b").unwrap() - 110;
        assert_eq!(file_header % 4, 0);
        assert_eq!(&text[file_header + 54..file_header + 62], "00000003");
    }
}
