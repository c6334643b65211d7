//! What the hv's gdbstub and `qs-bridge` both need to know of the GDB side.

/// The target description the hv's stub serves (`qXfer:features:read:target.xml`). Register
/// order = `g` packet order = the hv's `X86Regs`. `qs-bridge` answers gdb's reads of it from
/// this same copy, so that its 6.3 KB do not cross the serial link at every attach. That
/// makes this text part of the link protocol: change it only with `link::LINK_VERSION`, so
/// that a bridge and an hv that disagree refuse each other in the hello.
///
/// `cr0`, `cr4` and `efer` have `<flags>` types (gdb's target description format), so that
/// `info registers efer` shows `[ SCE LME LMA NXE ]` as with QEMU's stub, not a bare number.
/// The bits and their names are the AMD APM's, vol. 2, §3.1.1 (CR0), §3.1.3 (CR4) and
/// §3.1.7 (EFER); `regnum`s and sizes are unchanged, so the `g` packet is too.
pub const TARGET_XML: &str = r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64</architecture><feature name="org.gnu.gdb.i386.core"><flags id="i386_eflags" size="4"><field name="CF" start="0" end="0"/><field name="" start="1" end="1"/><field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/><field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/><field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/><field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/><field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/><field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/><field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/><field name="ID" start="21" end="21"/></flags><reg name="rax" bitsize="64" type="int64" regnum="0"/><reg name="rbx" bitsize="64" type="int64"/><reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/><reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/><reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/><reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/><reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/><reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/><reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/><reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/><reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/><reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/><reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/><reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/><reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/><reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/><reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/><reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/><reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/><reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/><reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/></feature><feature name="org.gnu.gdb.i386.sse"><vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/><union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union><reg name="xmm0" bitsize="128" type="vec128" regnum="40"/><reg name="xmm1" bitsize="128" type="vec128"/><reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/><reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/><reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/><reg name="xmm8" bitsize="128" type="vec128"/><reg name="xmm9" bitsize="128" type="vec128"/><reg name="xmm10" bitsize="128" type="vec128"/><reg name="xmm11" bitsize="128" type="vec128"/><reg name="xmm12" bitsize="128" type="vec128"/><reg name="xmm13" bitsize="128" type="vec128"/><reg name="xmm14" bitsize="128" type="vec128"/><reg name="xmm15" bitsize="128" type="vec128"/><reg name="mxcsr" bitsize="32" type="int" group="vector"/></feature><feature name="org.gnu.gdb.i386.segments"><reg name="fs_base" bitsize="64" type="int64" regnum="57"/><reg name="gs_base" bitsize="64" type="int64"/></feature><feature name="org.quicksilver.x86.sys"><flags id="x86_cr0" size="8"><field name="PE" start="0" end="0"/><field name="MP" start="1" end="1"/><field name="EM" start="2" end="2"/><field name="TS" start="3" end="3"/><field name="ET" start="4" end="4"/><field name="NE" start="5" end="5"/><field name="WP" start="16" end="16"/><field name="AM" start="18" end="18"/><field name="NW" start="29" end="29"/><field name="CD" start="30" end="30"/><field name="PG" start="31" end="31"/></flags><flags id="x86_cr4" size="8"><field name="VME" start="0" end="0"/><field name="PVI" start="1" end="1"/><field name="TSD" start="2" end="2"/><field name="DE" start="3" end="3"/><field name="PSE" start="4" end="4"/><field name="PAE" start="5" end="5"/><field name="MCE" start="6" end="6"/><field name="PGE" start="7" end="7"/><field name="PCE" start="8" end="8"/><field name="OSFXSR" start="9" end="9"/><field name="OSXMMEXCPT" start="10" end="10"/><field name="UMIP" start="11" end="11"/><field name="LA57" start="12" end="12"/><field name="FSGSBASE" start="16" end="16"/><field name="PCIDE" start="17" end="17"/><field name="OSXSAVE" start="18" end="18"/><field name="SMEP" start="20" end="20"/><field name="SMAP" start="21" end="21"/><field name="PKE" start="22" end="22"/><field name="CET" start="23" end="23"/></flags><flags id="x86_efer" size="8"><field name="SCE" start="0" end="0"/><field name="LME" start="8" end="8"/><field name="LMA" start="10" end="10"/><field name="NXE" start="11" end="11"/><field name="SVME" start="12" end="12"/><field name="LMSLE" start="13" end="13"/><field name="FFXSR" start="14" end="14"/><field name="TCE" start="15" end="15"/></flags><reg name="k_gs_base" bitsize="64" type="int64" regnum="59"/><reg name="cr0" bitsize="64" type="x86_cr0"/><reg name="cr2" bitsize="64" type="int64"/><reg name="cr3" bitsize="64" type="int64"/><reg name="cr4" bitsize="64" type="x86_cr4"/><reg name="cr8" bitsize="64" type="int64"/><reg name="efer" bitsize="64" type="x86_efer"/></feature></target>"#;

#[cfg(test)]
mod tests {
    use super::TARGET_XML;

    /// The `<field>`s of `<flags id="{id}">`, as (name, start, end), and its size in bytes.
    fn flags(id: &str) -> (u32, Vec<(String, u32, u32)>) {
        let start = TARGET_XML
            .find(&format!("<flags id=\"{id}\""))
            .unwrap_or_else(|| panic!("no flags type {id}"));
        let body = &TARGET_XML[start..];
        let body = &body[..body.find("</flags>").unwrap()];
        let attr = |s: &str, name: &str| -> String {
            let v = &s[s.find(&format!("{name}=\"")).unwrap() + name.len() + 2..];
            v[..v.find('"').unwrap()].to_string()
        };
        let size = attr(body, "size").parse().unwrap();
        let fields = body
            .split("<field ")
            .skip(1)
            .map(|f| {
                (
                    attr(f, "name"),
                    attr(f, "start").parse().unwrap(),
                    attr(f, "end").parse().unwrap(),
                )
            })
            .collect();
        (size, fields)
    }

    #[test]
    fn cr0_cr4_and_efer_have_flag_types_with_the_manuals_bits() {
        /// A register, its flags type, and the manual's (name, bit) for each flag.
        type Described = (&'static str, &'static str, &'static [(&'static str, u32)]);
        let apm: [Described; 3] = [
            (
                "cr0",
                "x86_cr0",
                &[
                    ("PE", 0),
                    ("MP", 1),
                    ("EM", 2),
                    ("TS", 3),
                    ("ET", 4),
                    ("NE", 5),
                    ("WP", 16),
                    ("AM", 18),
                    ("NW", 29),
                    ("CD", 30),
                    ("PG", 31),
                ],
            ),
            (
                "cr4",
                "x86_cr4",
                &[
                    ("VME", 0),
                    ("PVI", 1),
                    ("TSD", 2),
                    ("DE", 3),
                    ("PSE", 4),
                    ("PAE", 5),
                    ("MCE", 6),
                    ("PGE", 7),
                    ("PCE", 8),
                    ("OSFXSR", 9),
                    ("OSXMMEXCPT", 10),
                    ("UMIP", 11),
                    ("LA57", 12),
                    ("FSGSBASE", 16),
                    ("PCIDE", 17),
                    ("OSXSAVE", 18),
                    ("SMEP", 20),
                    ("SMAP", 21),
                    ("PKE", 22),
                    ("CET", 23),
                ],
            ),
            (
                "efer",
                "x86_efer",
                &[
                    ("SCE", 0),
                    ("LME", 8),
                    ("LMA", 10),
                    ("NXE", 11),
                    ("SVME", 12),
                    ("LMSLE", 13),
                    ("FFXSR", 14),
                    ("TCE", 15),
                ],
            ),
        ];
        for (reg, id, bits) in apm {
            assert!(
                TARGET_XML.contains(&format!(
                    "<reg name=\"{reg}\" bitsize=\"64\" type=\"{id}\"/>"
                )),
                "{reg} is not of type {id}"
            );
            let (size, fields) = flags(id);
            assert_eq!(size, 8, "{id}: as wide as the 64-bit register");
            let want: Vec<(String, u32, u32)> =
                bits.iter().map(|&(n, b)| (n.to_string(), b, b)).collect();
            assert_eq!(fields, want, "{id}");
        }
        // Defined before the registers that use them, in the same feature.
        let sys = &TARGET_XML[TARGET_XML.find("org.quicksilver.x86.sys").unwrap()..];
        assert!(sys.find("<flags id=\"x86_efer\"").unwrap() < sys.find("<reg ").unwrap());
    }
}
