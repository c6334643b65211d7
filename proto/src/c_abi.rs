//! What the C side needs to know about the ABI's types, kept next to their Rust definitions so
//! that `guest-agent/linux/qs_abi.h` is generated (`cargo xtask abi-header`) instead of
//! written a second time by hand.
//!
//! - [`abi_enum!`] defines a `repr` enum once: its numbers, its `from_*` conversion, the list
//!   of its variants with their documentation, and for statuses the user-facing message.
//! - [`abi_struct!`] defines a `repr(C)` struct once, with the description of its fields
//!   ([`CStruct`]), and proves at compile time that it has no padding (so that the C compiler
//!   lays it out the same way, and no byte of it is left uninitialized).
//! - [`c_fields!`] describes a struct defined elsewhere (the image header) from its field
//!   names; the compiler checks each name and infers each type.
//!
//! The generated header asserts every size and offset given here, so a C struct that drifted
//! from its Rust twin fails the module's build, not a user.

/// A Rust field type that has a C spelling: an integer, or an array of one.
pub trait CType {
    /// The Linux UAPI name of the (element) type: `__u64`, `__s32`, ...
    const C_NAME: &'static str;
    /// Elements if this is an array, 0 if a scalar.
    const LEN: usize;
}

macro_rules! c_scalars {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CType for $t {
            const C_NAME: &'static str = $c;
            const LEN: usize = 0;
        })*
    };
}

c_scalars!(u8 => "__u8", u16 => "__u16", u32 => "__u32", u64 => "__u64",
           i8 => "__s8", i16 => "__s16", i32 => "__s32", i64 => "__s64");

impl<T: CType, const N: usize> CType for [T; N] {
    const C_NAME: &'static str = T::C_NAME;
    const LEN: usize = N;
}

/// One field of a [`CStruct`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CField {
    /// The field's name, the same in Rust and C.
    pub name: &'static str,
    /// [`CType::C_NAME`] of its type.
    pub c_type: &'static str,
    /// [`CType::LEN`]: elements if an array, 0 if a scalar.
    pub len: usize,
    /// Byte offset in the struct.
    pub offset: usize,
    /// Bytes.
    pub size: usize,
    /// Its documentation (the `///` lines, joined with newlines), or empty.
    pub doc: &'static str,
}

impl CField {
    /// Describes field `name` of type `T` at `offset`.
    pub const fn of<T: CType>(name: &'static str, offset: usize, doc: &'static str) -> CField {
        CField {
            name,
            c_type: T::C_NAME,
            len: T::LEN,
            offset,
            size: core::mem::size_of::<T>(),
            doc,
        }
    }

    /// Like [`CField::of`], with `T` inferred from an accessor (`|s| &s.field`), for structs
    /// whose definition is not wrapped in [`abi_struct!`].
    pub const fn via<S, T: CType>(name: &'static str, offset: usize, _get: fn(&S) -> &T) -> CField {
        CField::of::<T>(name, offset, "")
    }
}

/// A `repr(C)` struct that the C side declares too.
pub trait CStruct: Sized {
    /// Its C tag: `struct <C_NAME>`.
    const C_NAME: &'static str;
    /// Its documentation, or empty.
    const DOC: &'static str;
    /// Every field, in order.
    const FIELDS: &'static [CField];
    /// `size_of::<Self>()`.
    const SIZE: usize = core::mem::size_of::<Self>();
}

/// Do `fields` tile `[0, size)` in order, with no gap and nothing after the last? A struct that
/// passes has no padding, so C lays it out the same way and every byte is a field's.
pub const fn fields_tile(fields: &[CField], size: usize) -> bool {
    let mut at = 0;
    let mut i = 0;
    while i < fields.len() {
        if fields[i].offset != at {
            return false;
        }
        at += fields[i].size;
        i += 1;
    }
    at == size
}

/// One variant of an [`abi_enum!`] enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CVariant {
    /// The Rust name (`NoNpt`); C spells it `PREFIX_NO_NPT`.
    pub name: &'static str,
    /// Its number, widened to i128 so that every repr fits.
    pub value: i128,
    /// Its documentation (the `///` lines, joined with newlines).
    pub doc: &'static str,
    /// The user-facing message, for enums that have them (statuses).
    pub message: Option<&'static str>,
}

/// Defines an ABI enum once. Each variant needs a `///` doc comment and an explicit number;
/// with `=> "message"` after every number the enum also gets `message()`.
///
/// ```
/// quicksilver_proto::abi_enum! {
///     /// What a frobnication returned.
///     pub enum Frob: i64, from_i64 {
///         /// It worked.
///         Fine = 0 => "fine",
///         /// It did not.
///         Broken = 1 => "broken: fix it",
///     }
/// }
/// assert_eq!(Frob::from_i64(1), Some(Frob::Broken));
/// assert_eq!(Frob::Broken.message(), "broken: fix it");
/// assert_eq!(Frob::VARIANTS[1].name, "Broken");
/// ```
#[macro_export]
macro_rules! abi_enum {
    (@define [$($doc:literal)*] $vis:vis $name:ident $repr:ident $from:ident
        [$([$($vdoc:literal)*] $variant:ident $value:literal [$($msg:literal)?])+]) => {
        $(#[doc = $doc])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[doc = $vdoc])* $variant = $value,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Every variant's name, number and documentation, for the C header.
            pub const VARIANTS: &'static [$crate::c_abi::CVariant] = &[$(
                $crate::c_abi::CVariant {
                    name: stringify!($variant),
                    value: $value as i128,
                    doc: concat!($($vdoc, "\n",)*),
                    message: $crate::abi_enum!(@msg $($msg)?),
                }
            ),+];

            /// The variant with number `v`, if there is one.
            pub const fn $from(v: $repr) -> Option<$name> {
                match v {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
    (@msg) => { None };
    (@msg $msg:literal) => { Some($msg) };
    (
        $(#[doc = $doc:literal])*
        $vis:vis enum $name:ident : $repr:ident, $from:ident {
            $(
                $(#[doc = $vdoc:literal])*
                $variant:ident = $value:literal => $msg:literal
            ),+ $(,)?
        }
    ) => {
        $crate::abi_enum!(@define [$($doc)*] $vis $name $repr $from
            [$([$($vdoc)*] $variant $value [$msg])+]);

        impl $name {
            /// What went wrong and what to do about it, in one line (the same text in the C
            /// header, `qs_status_text`).
            pub const fn message(self) -> &'static str {
                match self {
                    $($name::$variant => $msg,)+
                }
            }
        }
    };
    (
        $(#[doc = $doc:literal])*
        $vis:vis enum $name:ident : $repr:ident, $from:ident {
            $(
                $(#[doc = $vdoc:literal])*
                $variant:ident = $value:literal
            ),+ $(,)?
        }
    ) => {
        $crate::abi_enum!(@define [$($doc)*] $vis $name $repr $from
            [$([$($vdoc)*] $variant $value [])+]);
    };
}

/// Defines an ABI struct once: `repr(C)`, with `Clone, Copy, Debug, Default, PartialEq, Eq`,
/// its [`CStruct`] description under the C tag given by `#[c_name = "..."]`, and a
/// compile-time proof that it has no padding. Every field needs a `///` doc comment (it goes
/// into the C header too).
///
/// A struct with padding does not compile (C may pad it differently, and the padding bytes
/// would reach the other side uninitialized):
///
/// ```compile_fail
/// quicksilver_proto::abi_struct! {
///     /// Four bytes of padding after `a`.
///     #[c_name = "qs_padded"]
///     pub struct Padded {
///         /// A.
///         pub a: u32,
///         /// B.
///         pub b: u64,
///     }
/// }
/// ```
#[macro_export]
macro_rules! abi_struct {
    (
        $(#[doc = $doc:literal])*
        #[c_name = $c_name:literal]
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $fdoc:literal])*
                $fvis:vis $field:ident : $ty:ty
            ),+ $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        $vis struct $name {
            $($(#[doc = $fdoc])* $fvis $field: $ty,)+
        }

        impl $crate::c_abi::CStruct for $name {
            const C_NAME: &'static str = $c_name;
            const DOC: &'static str = concat!($($doc, "\n",)*);
            const FIELDS: &'static [$crate::c_abi::CField] = &[$(
                $crate::c_abi::CField::of::<$ty>(
                    stringify!($field),
                    core::mem::offset_of!($name, $field),
                    concat!($($fdoc, "\n",)*),
                )
            ),+];
        }

        const _: () = assert!(
            $crate::c_abi::fields_tile(
                <$name as $crate::c_abi::CStruct>::FIELDS,
                core::mem::size_of::<$name>(),
            ),
            concat!(stringify!($name), " has padding or a field missing from its description"),
        );

        impl $name {
            /// One read from the start of `bytes` (as the machine wrote it: x86, little-endian),
            /// if there are enough of them.
            pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
                if bytes.len() < core::mem::size_of::<Self>() {
                    return None;
                }
                // SAFETY: `bytes` holds size_of::<Self>() readable bytes (checked above); every
                // field is an integer or an array of integers (`CField::of` takes only a
                // `CType`), so any bytes are a valid value; read_unaligned needs no alignment.
                Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
            }
        }
    };
}

/// The field descriptions of a `repr(C)` struct defined elsewhere, by name:
/// `c_fields!(ImageHeader { magic, abi_version, ... })`. Pair it with a `fields_tile` assert,
/// which fails if a field is left out.
#[macro_export]
macro_rules! c_fields {
    ($name:ident { $($field:ident),+ $(,)? }) => {
        &[$(
            $crate::c_abi::CField::via::<$name, _>(
                stringify!($field),
                core::mem::offset_of!($name, $field),
                |s: &$name| &s.$field,
            )
        ),+]
    };
}

/// The image header ([`crate::image::ImageHeader`]), described for C here so that its
/// definition stays plain Rust.
impl CStruct for crate::image::ImageHeader {
    const C_NAME: &'static str = "qs_image_header";
    const DOC: &'static str =
        " The hv image's header (proto/src/image.rs): the agent validates it before\n \
                               running a byte of the image.\n";
    const FIELDS: &'static [CField] = {
        use crate::image::ImageHeader;
        c_fields!(ImageHeader {
            magic,
            abi_version,
            header_size,
            image_size,
            checksum,
            code_crc,
            code_start,
            code_end,
            reloc_offset,
            reloc_count,
            entry_init,
            entry_activate,
            entry_control,
            mem_fixed,
            mem_per_cpu,
            mem_per_gib,
            max_cpus,
            flags,
            version,
            reserved,
        })
    };
}

const _: () = assert!(
    fields_tile(
        <crate::image::ImageHeader as CStruct>::FIELDS,
        crate::image::HEADER_SIZE
    ),
    "ImageHeader's C description misses a field"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_header_fields_are_described_in_order() {
        let f = <crate::image::ImageHeader as CStruct>::FIELDS;
        assert_eq!(f[0].name, "magic");
        assert_eq!((f[0].c_type, f[0].len, f[0].size), ("__u8", 8, 8));
        let checksum = f.iter().find(|f| f.name == "checksum").unwrap();
        assert_eq!(checksum.offset, crate::image::CHECKSUM_OFFSET);
        assert_eq!((checksum.c_type, checksum.len), ("__u32", 0));
    }

    #[test]
    fn a_gap_or_a_missing_field_does_not_tile() {
        let a = CField::of::<u32>("a", 0, "");
        let b = CField::of::<u64>("b", 8, "");
        assert!(!fields_tile(&[a, b], 16), "gap after a");
        assert!(!fields_tile(&[b], 16), "a missing");
        assert!(fields_tile(&[CField::of::<u64>("a", 0, ""), b], 16));
    }
}
