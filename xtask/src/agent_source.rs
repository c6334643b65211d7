//! What the package and its tests read out of the agent's C source
//! (`guest-agent/linux/quicksilver.c`): its module parameters with their descriptions (what
//! `modinfo quicksilver` shows), and where it looks for the hv image by default (where the
//! package installs it). Reading them from the source, rather than repeating them here, keeps
//! the package and the agent from drifting apart.
//!
//! This is not a C parser: it knows the two forms the agent uses, `module_param*(NAME, ...)`
//! and `MODULE_PARM_DESC(NAME, "..." "...")`, and `static char *image = "...";`, with comments
//! removed first so that a parameter commented out does not count.

use std::path::PathBuf;

/// The agent's C source, whose parameters and image path this module reads.
pub fn agent_c_source() -> PathBuf {
    crate::repo_root().join("guest-agent/linux/quicksilver.c")
}

/// One `module_param` of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleParam {
    /// The name users give on `modprobe`'s or `insmod`'s command line.
    pub name: String,
    /// Its `MODULE_PARM_DESC` (string literals joined), if it has one.
    pub description: Option<String>,
}

/// Every parameter the source declares, in order, with its description.
pub fn module_params(source: &str) -> Vec<ModuleParam> {
    let code = strip_comments(source);
    let mut params: Vec<ModuleParam> = Vec::new();
    // `module_param`, `module_param_named`, `_string`, `_array`, `_cb`: the name users type is
    // always the first argument.
    for (name, _) in calls(&code, "module_param") {
        if !params.iter().any(|p| p.name == name) {
            params.push(ModuleParam {
                name,
                description: None,
            });
        }
    }
    for (name, rest) in calls(&code, "MODULE_PARM_DESC") {
        if let Some(param) = params.iter_mut().find(|p| p.name == name) {
            param.description = string_literals(rest).filter(|d| !d.trim().is_empty());
        }
    }
    params
}

/// The default of the agent's `image=` parameter (`static char *image = "...";`): where the
/// agent loads the hv image from when not told otherwise.
pub fn image_default(source: &str) -> Option<String> {
    let code = strip_comments(source);
    code.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("static char *image")?;
        string_literals(rest.trim_start().strip_prefix('=')?)
    })
}

/// `(first argument, text after it)` for each call of a macro whose name starts with
/// `prefix` (then letters or `_`) and is followed by `(`.
fn calls<'a>(code: &'a str, prefix: &str) -> Vec<(String, &'a str)> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix).map(|i| from + i) {
        from = at + prefix.len();
        // A whole identifier: `xmodule_param` is not ours.
        if code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let after_name = code[from..].trim_start_matches(is_ident);
        let Some(args) = after_name.trim_start().strip_prefix('(') else {
            continue;
        };
        let Some((first, rest)) = args.split_once(',') else {
            continue;
        };
        let first = first.trim();
        if !first.is_empty() && first.chars().all(is_ident) {
            found.push((first.to_string(), rest));
        }
    }
    found
}

/// The C string literals at the start of `text` (after whitespace), joined as the compiler
/// joins adjacent literals; `None` if `text` does not start with one. Escapes are kept as
/// written except `\"` and `\\`: enough to compare descriptions.
fn string_literals(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text.trim_start();
    let mut any = false;
    while let Some(body) = rest.strip_prefix('"') {
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()? {
                    (_, c @ ('"' | '\\')) => out.push(c),
                    (_, c) => {
                        out.push('\\');
                        out.push(c);
                    }
                },
                (_, c) => out.push(c),
            }
        };
        any = true;
        rest = body[end + 1..].trim_start();
    }
    any.then_some(out)
}

/// `source` without its comments (each replaced by a space), string and character literals
/// left intact (a `//` inside a string is not a comment).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    // Keep line breaks, so that line-based matching still sees lines.
                    if c == '\n' {
                        out.push('\n');
                    }
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
static char *image = "/usr/lib/quicksilver/hv.img"; /* where the package puts it */
module_param(image, charp, 0444);
MODULE_PARM_DESC(image, "path of the hv image "
                        "(default \"/usr/lib/quicksilver/hv.img\"); see http://example");
static unsigned int link_port;
module_param_named(link_port, qs_port, uint, 0444);
MODULE_PARM_DESC(link_port, "I/O port");
static unsigned int quiet;
module_param(quiet, uint, 0444);
MODULE_PARM_DESC(quiet, "");
// module_param(old, uint, 0444);
/* module_param(older, uint, 0444); */
static int xmodule_param(int a, int b);
static int undocumented;
module_param(undocumented, int, 0444);
"#;

    #[test]
    fn every_parameter_is_found_with_its_description_or_none() {
        let params = module_params(SOURCE);
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["image", "link_port", "quiet", "undocumented"]);
        assert_eq!(
            params[0].description.as_deref(),
            Some(
                "path of the hv image (default \"/usr/lib/quicksilver/hv.img\"); see http://example"
            )
        );
        assert_eq!(params[1].description.as_deref(), Some("I/O port"));
        assert_eq!(params[2].description, None, "an empty description is none");
        assert_eq!(params[3].description, None);
    }

    #[test]
    fn the_image_default_is_the_initializer_of_image() {
        assert_eq!(
            image_default(SOURCE).as_deref(),
            Some("/usr/lib/quicksilver/hv.img")
        );
        assert_eq!(image_default("static char *key_file = \"\";"), None);
    }

    #[test]
    fn comments_go_and_strings_stay() {
        assert_eq!(
            strip_comments("a /* b\nc */ d // e\n\"f // g\" '/'"),
            "a \n  d \n\"f // g\" '/'"
        );
    }
}
