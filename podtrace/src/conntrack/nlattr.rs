//! Netlink attributes (`struct nlattr`: u16 length, u16 type, payload, 4-byte alignment):
//! a total reader for bytes from the kernel (or anyone else) and a small writer for
//! requests. Reading never panics and never reads past the buffer: a malformed attribute
//! ends the walk with an [`AttrError`].

/// The nested flag in an attribute's type (set by the kernel on nested ctnetlink attributes).
pub const NLA_F_NESTED: u16 = 1 << 15;
/// The byte-order flag in an attribute's type.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// What is left of the type without the flags.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
const HDR: usize = 4;

/// Rounds `n` up to netlink's 4-byte alignment (saturating: never overflows).
pub fn align(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// One attribute: its type (flags removed) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub nested: bool,
    pub payload: &'a [u8],
}

/// Why a walk over attributes stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrError {
    /// Fewer than 4 bytes left for a header (`at` is the offset).
    ShortHeader { at: usize },
    /// `nla_len` is below the header size or runs past the buffer.
    BadLength { at: usize, len: u16 },
}

impl std::fmt::Display for AttrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrError::ShortHeader { at } => write!(f, "truncated attribute header at byte {at}"),
            AttrError::BadLength { at, len } => {
                write!(f, "attribute at byte {at} claims {len} bytes")
            }
        }
    }
}

/// Iterator over the attributes in a buffer; yields `Err` once for a malformed one, then
/// stops.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
    done: bool,
}

/// Walks the attributes in `buf`.
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs {
        buf,
        pos: 0,
        done: false,
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, AttrError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.buf.len() {
            return None;
        }
        let at = self.pos;
        let rest = &self.buf[at..];
        let Some(hdr) = rest.get(..HDR) else {
            self.done = true;
            return Some(Err(AttrError::ShortHeader { at }));
        };
        let len = u16::from_ne_bytes([hdr[0], hdr[1]]);
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]);
        let Some(payload) = rest
            .get(HDR..usize::from(len))
            .filter(|_| usize::from(len) >= HDR)
        else {
            self.done = true;
            return Some(Err(AttrError::BadLength { at, len }));
        };
        // The last attribute's padding may be missing: never step past the end.
        self.pos = at
            .saturating_add(align(usize::from(len)))
            .min(self.buf.len());
        Some(Ok(Attr {
            kind: kind & NLA_TYPE_MASK,
            nested: kind & NLA_F_NESTED != 0,
            payload,
        }))
    }
}

impl<'a> Attr<'a> {
    /// The attributes nested in this one.
    pub fn nested(&self) -> Attrs<'a> {
        attrs(self.payload)
    }

    pub fn u8(&self) -> Option<u8> {
        match self.payload {
            [b] => Some(*b),
            _ => None,
        }
    }

    /// A big-endian (network order) u16, as ctnetlink sends ports and zones.
    pub fn be16(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.payload.try_into().ok()?))
    }

    pub fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.payload.try_into().ok()?))
    }

    pub fn be64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.payload.try_into().ok()?))
    }
}

/// Builds attributes into a request buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    /// Appends one attribute with `payload` (padded to 4 bytes).
    pub fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = (HDR + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align(self.buf.len()), 0);
    }

    /// Appends a nested attribute whose content `f` writes.
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        f(&mut inner);
        self.put(kind | NLA_F_NESTED, &inner.buf);
    }
}
