//! Just enough of a BTF reader to find kernel structure member offsets and enum names in
//! /sys/kernel/btf/vmlinux, so the tracing programs can read `sk_buff`, `net_device` and
//! `net` on whatever kernel build they run on, and drop reasons can be shown by name.
use anyhow::{anyhow, bail, Context as _, Result};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset within the containing struct.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        name: u32,
        members: Vec<Member>,
    },
    Enum {
        name: u32,
        values: Vec<(u32, i64)>,
    },
    /// Typedef/const/volatile/restrict/type tag: refers to another type.
    Alias {
        name: u32,
        target: u32,
    },
    Ptr {
        target: u32,
    },
    FuncProto {
        params: u32,
    },
    /// A kernel function (what a kprobe can go on, unless inlined away or blacklisted).
    Func {
        name: u32,
        proto: u32,
    },
    Other,
}

/// A parsed BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the void type.
    types: Vec<Type>,
    /// (hash of the name, type id) of every named type, sorted: a lookup is a binary search,
    /// and building it allocates nothing per name (a map of owned names cost most of the
    /// parse, ~40 ms of podtrace's start).
    by_name: Vec<(u64, u32)>,
}

/// FNV-1a of a name's bytes.
fn name_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn u32_at(data: &[u8], off: usize) -> Result<u32> {
    let b = data
        .get(off..off + 4)
        .ok_or_else(|| anyhow!("truncated BTF at byte {off}"))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The running kernel's BTF blob.
pub fn read_sys_fs() -> Result<Vec<u8>> {
    let path = "/sys/kernel/btf/vmlinux";
    std::fs::read(path)
        .with_context(|| format!("reading {path} (podtrace needs a kernel with BTF)"))
}

/// The bytes a type entry of `kind` with `vlen` members has after its 12-byte header.
fn extra_len(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_ENUM64 | KIND_DATASEC => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        _ => 0,
    }
}

/// How many types the type section holds (stops at the first malformed entry: the parse
/// that follows says what is wrong).
fn count_types(tdata: &[u8]) -> usize {
    let mut n = 0;
    let mut off = 0usize;
    while off + 12 <= tdata.len() {
        let Ok(info) = u32_at(tdata, off + 4) else {
            break;
        };
        off += 12 + extra_len((info >> 24) & 0x1f, (info & 0xffff) as usize);
        n += 1;
    }
    n
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        Self::parse(&read_sys_fs()?)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            bail!("not a (little-endian) BTF blob");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| anyhow!("BTF string section out of bounds"))?
            .to_vec();
        let tdata = data
            .get(types_start..types_start + type_len)
            .ok_or_else(|| anyhow!("BTF type section out of bounds"))?;

        let mut types = Vec::with_capacity(1 + count_types(tdata));
        types.push(Type::Other);
        let mut off = 0usize;
        while off < tdata.len() {
            let name = u32_at(tdata, off)?;
            let info = u32_at(tdata, off + 4)?;
            let size_or_type = u32_at(tdata, off + 8)?;
            let body = off + 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_INT => Type::Other,
                KIND_PTR => Type::Ptr {
                    target: size_or_type,
                },
                KIND_FUNC => Type::Func {
                    name,
                    proto: size_or_type,
                },
                KIND_FWD | KIND_FLOAT => Type::Other,
                KIND_ARRAY => Type::Other,
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = body + 12 * i;
                        let raw = u32_at(tdata, m + 8)?;
                        members.push(Member {
                            name: u32_at(tdata, m)?,
                            type_id: u32_at(tdata, m + 4)?,
                            bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    Type::Composite { name, members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = body + 8 * i;
                        let v = u32_at(tdata, e + 4)?;
                        let v = if kind_flag { v as i32 as i64 } else { v as i64 };
                        values.push((u32_at(tdata, e)?, v));
                    }
                    Type::Enum { name, values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = body + 12 * i;
                        let lo = u32_at(tdata, e + 4)? as u64;
                        let hi = u32_at(tdata, e + 8)? as u64;
                        values.push((u32_at(tdata, e)?, ((hi << 32) | lo) as i64));
                    }
                    Type::Enum { name, values }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        name: if kind == KIND_TYPEDEF { name } else { 0 },
                        target: size_or_type,
                    }
                }
                KIND_FUNC_PROTO => Type::FuncProto {
                    params: vlen as u32,
                },
                KIND_VAR | KIND_DECL_TAG | KIND_DATASEC => Type::Other,
                other => bail!("unknown BTF kind {other}"),
            };
            off = body + extra_len(kind, vlen);
            types.push(ty);
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: Vec::new(),
        };
        let mut by_name = Vec::with_capacity(btf.types.len());
        for (id, ty) in btf.types.iter().enumerate() {
            let name = match ty {
                Type::Composite { name, .. }
                | Type::Enum { name, .. }
                | Type::Alias { name, .. }
                | Type::Func { name, .. } => *name,
                _ => continue,
            };
            if name != 0 {
                by_name.push((name_hash(btf.str_at(name).as_bytes()), id as u32));
            }
        }
        by_name.sort_unstable();
        btf.by_name = by_name;
        Ok(btf)
    }

    /// The ids of the types called `name`, in id order.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        let h = name_hash(name.as_bytes());
        let start = self.by_name.partition_point(|(x, _)| *x < h);
        self.by_name[start..]
            .iter()
            .take_while(move |(x, _)| *x == h)
            .map(|(_, id)| *id)
            .filter(move |id| {
                let n = match self.types.get(*id as usize) {
                    Some(
                        Type::Composite { name, .. }
                        | Type::Enum { name, .. }
                        | Type::Alias { name, .. }
                        | Type::Func { name, .. },
                    ) => *name,
                    _ => return false,
                };
                self.str_at(n) == name
            })
    }

    fn str_at(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn resolve_alias(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias { target, .. }) => id = *target,
                _ => break,
            }
        }
        id
    }

    fn composite(&self, name: &str) -> Result<&[Member]> {
        for id in self.named(name) {
            if let Some(Type::Composite { members, .. }) = self.types.get(id as usize) {
                if !members.is_empty() {
                    return Ok(members);
                }
            }
        }
        bail!("struct {name} not found in the kernel's BTF")
    }

    /// Bit offset of `field` in `members`, looking into anonymous struct/union members.
    fn find_member(&self, members: &[Member], field: &str, depth: u32) -> Option<u32> {
        for m in members {
            if m.name != 0 && self.str_at(m.name) == field {
                return Some(m.bit_offset);
            }
        }
        if depth > 8 {
            return None;
        }
        for m in members.iter().filter(|m| m.name == 0) {
            let id = self.resolve_alias(m.type_id);
            if let Some(Type::Composite { members: inner, .. }) = self.types.get(id as usize) {
                if let Some(off) = self.find_member(inner, field, depth + 1) {
                    return Some(m.bit_offset + off);
                }
            }
        }
        None
    }

    /// Byte offset of `strukt.field` (a field of an anonymous member is found too).
    pub fn member_offset(&self, strukt: &str, field: &str) -> Result<u32> {
        let members = self.composite(strukt)?;
        let bits = self
            .find_member(members, field, 0)
            .ok_or_else(|| anyhow!("{strukt}.{field} not found in the kernel's BTF"))?;
        if bits % 8 != 0 {
            bail!("{strukt}.{field} is a bitfield");
        }
        Ok(bits / 8)
    }

    /// How many arguments the tracepoint `name` (as tp_btf sees it: `btf_trace_NAME`, a
    /// pointer to a function whose first parameter is the probe's data) passes, if the
    /// kernel has it.
    pub fn tracepoint_args(&self, name: &str) -> Option<u32> {
        let typedef = format!("btf_trace_{name}");
        for id in self.named(&typedef) {
            if let Some(Type::Alias { target, .. }) = self.types.get(id as usize) {
                let ptr = self.resolve_alias(*target);
                if let Some(Type::Ptr { target }) = self.types.get(ptr as usize) {
                    let proto = self.resolve_alias(*target);
                    if let Some(Type::FuncProto { params }) = self.types.get(proto as usize) {
                        return Some(params.saturating_sub(1));
                    }
                }
            }
        }
        None
    }

    /// The number of parameters of kernel function `name`, if BTF describes it.
    pub fn function_params(&self, name: &str) -> Option<u32> {
        for id in self.named(name) {
            if let Some(Type::Func { proto, .. }) = self.types.get(id as usize) {
                if let Some(Type::FuncProto { params }) = self.types.get(*proto as usize) {
                    return Some(*params);
                }
            }
        }
        None
    }

    /// The values of enum `name` with their names.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>> {
        for id in self.named(name) {
            if let Some(Type::Enum { values, .. }) = self.types.get(id as usize) {
                return Ok(values
                    .iter()
                    .map(|(n, v)| (self.str_at(*n).to_owned(), *v))
                    .collect());
            }
        }
        bail!("enum {name} not found in the kernel's BTF")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand: `struct outer { int a; union { int b; struct { int pad; u16 c; }; }; }`
    /// and `enum e { X = 1, Y = 2 }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0pad\0int\0e\0X\0Y\0btf_trace_tp\0fn\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::<u8>::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: anonymous struct { int pad; int c @ 32 }
        push(0);
        push((KIND_STRUCT << 24) | 2);
        push(8);
        push(s("pad"));
        push(1);
        push(0);
        push(s("c"));
        push(1);
        push(32);
        // 3: anonymous union { int b; struct 2; }
        push(0);
        push((KIND_UNION << 24) | 2);
        push(8);
        push(s("b"));
        push(1);
        push(0);
        push(0);
        push(2);
        push(0);
        // 4: struct outer { int a; union 3 @ 64 }
        push(s("outer"));
        push((KIND_STRUCT << 24) | 2);
        push(16);
        push(s("a"));
        push(1);
        push(0);
        push(0);
        push(3);
        push(64);
        // 5: enum e
        push(s("e"));
        push((KIND_ENUM << 24) | 2);
        push(4);
        push(s("X"));
        push(1);
        push(s("Y"));
        push(2);
        // 6: func_proto (void *, int, int) — a tracepoint's probe: data plus 2 arguments
        push(0);
        push((KIND_FUNC_PROTO << 24) | 3);
        push(0);
        for _ in 0..3 {
            push(0);
            push(1);
        }
        // 7: pointer to 6; 8: typedef btf_trace_tp → 7; 9: func fn → 6
        push(0);
        push(KIND_PTR << 24);
        push(6);
        push(s("btf_trace_tp"));
        push(KIND_TYPEDEF << 24);
        push(7);
        push(s("fn"));
        push(KIND_FUNC << 24);
        push(6);
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.push(1);
        blob.push(0);
        blob.extend_from_slice(&24u32.to_le_bytes());
        blob.extend_from_slice(&0u32.to_le_bytes());
        blob.extend_from_slice(&(t.len() as u32).to_le_bytes());
        blob.extend_from_slice(&(t.len() as u32).to_le_bytes());
        blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        blob.extend_from_slice(&t);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 12);
        assert!(btf.member_offset("outer", "nope").is_err());
        assert!(btf.member_offset("missing", "a").is_err());
    }

    #[test]
    fn reads_enums() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(
            btf.enum_values("e").unwrap(),
            vec![("X".to_owned(), 1), ("Y".to_owned(), 2)]
        );
    }

    #[test]
    fn reads_tracepoint_and_function_signatures() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.tracepoint_args("tp"), Some(2));
        assert_eq!(btf.tracepoint_args("nope"), None);
        assert_eq!(btf.function_params("fn"), Some(3));
        assert_eq!(btf.function_params("outer"), None);
    }

    /// The type section of a blob (header fields as `parse` reads them).
    fn type_section(data: &[u8]) -> &[u8] {
        let hdr_len = u32_at(data, 4).unwrap() as usize;
        let start = hdr_len + u32_at(data, 8).unwrap() as usize;
        &data[start..start + u32_at(data, 12).unwrap() as usize]
    }

    #[test]
    fn the_count_before_the_parse_is_the_parse_s() {
        let blob = sample();
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(count_types(type_section(&blob)) + 1, btf.types.len());
        if let Ok(vmlinux) = read_sys_fs() {
            let btf = Btf::parse(&vmlinux).unwrap();
            assert_eq!(count_types(type_section(&vmlinux)) + 1, btf.types.len());
            assert_eq!(btf.types.capacity(), btf.types.len());
        }
        // A truncated section: counted up to where it ends.
        assert!(count_types(&type_section(&blob)[..13]) <= 1);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not btf at all").is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every machine podtrace supports has BTF; this checks the offsets we rely on exist.
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return;
        };
        for (s, f) in [
            ("sk_buff", "head"),
            ("sk_buff", "len"),
            ("sk_buff", "network_header"),
            ("sk_buff", "dev"),
            ("net_device", "ifindex"),
            ("net_device", "nd_net"),
            ("net", "ns"),
            ("ns_common", "inum"),
        ] {
            btf.member_offset(s, f).unwrap();
        }
        assert!(btf.tracepoint_args("kfree_skb").unwrap() >= 3);
        assert_eq!(btf.tracepoint_args("fib_table_lookup"), Some(4));
        assert_eq!(btf.tracepoint_args("net_dev_start_xmit"), Some(2));
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
        assert_eq!(btf.function_params("fib_table_lookup"), Some(4));
        let reasons = btf.enum_values("skb_drop_reason").unwrap();
        assert!(reasons
            .iter()
            .any(|(n, _)| n == "SKB_DROP_REASON_NETFILTER_DROP"));
    }
}
