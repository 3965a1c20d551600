//! Shard lists as users write them: plain paths, globs and brace ranges.
//!
//! `cc12m/{00000..01242}.tar` is how img2dataset users name their shards (the
//! webdataset / braceexpand convention), so brace groups are expanded first and
//! every result is then either an existing file or a glob.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// More paths than any real shard list; stops `{0..999999999}` from eating memory.
const MAX_EXPANDED_PATHS: usize = 1_000_000;
/// Total length of the expanded paths (64 MiB: a million paths of 64 bytes). Without it
/// a long pattern times a large brace range (4 KB x `{0..999999}`) would build gigabytes.
const MAX_EXPANDED_BYTES: usize = 64 << 20;
/// Text built while expanding, intermediate strings included (four times the limit
/// above: branching groups build at most about twice their result). Without it a
/// 4 KB pattern of a few groups and hundreds of single-value ones (`{1..1}`)
/// copies every path once per group, tens of GB of work.
const MAX_EXPANSION_WORK: usize = 4 * MAX_EXPANDED_BYTES;

/// Why a list of shard patterns could not be turned into files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardError {
    /// The pattern is malformed: an unbalanced brace, a bad glob, too many paths.
    InvalidPattern { pattern: String, reason: String },
    /// A glob that matched no file.
    NoMatch { pattern: String },
    /// A path (given as is, or produced by a brace group) that is not a file.
    NotFound { pattern: String, path: PathBuf },
    /// A directory that a glob had to list could not be read.
    Unreadable {
        pattern: String,
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPattern { pattern, reason } => {
                write!(f, "invalid shard pattern '{pattern}': {reason}")
            }
            Self::NoMatch { pattern } => write!(f, "no shard file matches '{pattern}'"),
            Self::NotFound { pattern, path } if Path::new(pattern) == path => {
                write!(f, "shard file not found: '{pattern}'")
            }
            Self::NotFound { pattern, path } => write!(
                f,
                "shard file not found: '{}' (from pattern '{pattern}')",
                path.display()
            ),
            Self::Unreadable {
                pattern,
                path,
                reason,
            } => write!(
                f,
                "cannot list '{}' for pattern '{pattern}': {reason}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ShardError {}

/// Expands shard patterns into existing files, in order and without repeats.
///
/// Each pattern may be a plain path, contain brace groups (`{00000..01242}`
/// keeps the zero-padded width, `{a,b,c}` lists alternatives, several groups
/// and nesting are allowed) and glob characters (`*`, `?`, `[..]`, matched in
/// sorted order, hidden files only by an explicit leading dot). A path that
/// exists as written is taken literally, braces and brackets included. A path
/// that does not exist, or a glob that matches nothing, is an error naming it.
pub fn expand_shard_paths(patterns: &[String]) -> Result<Vec<PathBuf>, ShardError> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    for pattern in patterns {
        for path in expand_one(pattern)? {
            if seen.insert(path.clone()) {
                paths.push(path);
            }
        }
    }
    Ok(paths)
}

fn expand_one(pattern: &str) -> Result<Vec<PathBuf>, ShardError> {
    if pattern.is_empty() {
        return Err(invalid(pattern, "empty path"));
    }
    if Path::new(pattern).is_file() {
        return Ok(vec![PathBuf::from(pattern)]);
    }
    let mut paths = Vec::new();
    for candidate in expand_braces(pattern)? {
        let path = PathBuf::from(&candidate);
        if path.is_file() {
            paths.push(path);
        } else if has_glob_chars(&candidate) {
            paths.extend(glob_files(pattern, &candidate)?);
        } else {
            return Err(ShardError::NotFound {
                pattern: pattern.to_owned(),
                path,
            });
        }
        if paths.len() > MAX_EXPANDED_PATHS {
            return Err(too_many(pattern));
        }
    }
    Ok(paths)
}

fn has_glob_chars(candidate: &str) -> bool {
    candidate.contains(['*', '?', '['])
}

fn glob_files(pattern: &str, candidate: &str) -> Result<Vec<PathBuf>, ShardError> {
    let options = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    };
    let matches =
        glob::glob_with(candidate, options).map_err(|e| invalid(pattern, &e.to_string()))?;
    let mut files = Vec::new();
    for entry in matches {
        let path = entry.map_err(|e| ShardError::Unreadable {
            pattern: pattern.to_owned(),
            path: e.path().to_path_buf(),
            reason: e.error().to_string(),
        })?;
        if path.is_file() {
            files.push(path);
        }
        if files.len() > MAX_EXPANDED_PATHS {
            return Err(too_many(pattern));
        }
    }
    if files.is_empty() {
        return Err(ShardError::NoMatch {
            pattern: pattern.to_owned(),
        });
    }
    files.sort();
    Ok(files)
}

/// Expands every brace group of `pattern`, left group varying slowest.
///
/// At most a million paths of 64 MiB in all, built with at most 256 MiB of
/// intermediate text: more is an `InvalidPattern` error, raised as soon as the
/// running totals pass a limit.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, ShardError> {
    let mut done = Vec::new();
    // A stack, children pushed in reverse, so results come out in pattern order.
    let mut todo = vec![pattern.to_owned()];
    // Length of every string in `done` and `todo`, and of every string built so far.
    let mut bytes = pattern.len();
    let mut work = 0usize;
    while let Some(text) = todo.pop() {
        let Some((open, close)) = first_brace_group(&text).map_err(|r| invalid(pattern, r))? else {
            done.push(text);
            continue;
        };
        let (head, body, tail) = (&text[..open], &text[open + 1..close], &text[close + 1..]);
        let items = brace_items(body).map_err(|r| invalid(pattern, &r))?;
        if done.len() + todo.len() + items.len() > MAX_EXPANDED_PATHS {
            return Err(too_many(pattern));
        }
        let added: usize = items
            .iter()
            .map(|item| head.len() + item.len() + tail.len())
            .sum();
        bytes = bytes - text.len() + added;
        if bytes > MAX_EXPANDED_BYTES {
            return Err(invalid(
                pattern,
                &format!(
                    "expands to more than {} MiB of paths",
                    MAX_EXPANDED_BYTES >> 20
                ),
            ));
        }
        work += added;
        if work > MAX_EXPANSION_WORK {
            return Err(invalid(
                pattern,
                &format!(
                    "takes more than {} MiB of intermediate paths to expand (too many brace groups)",
                    MAX_EXPANSION_WORK >> 20
                ),
            ));
        }
        todo.extend(items.iter().rev().map(|item| format!("{head}{item}{tail}")));
    }
    Ok(done)
}

/// Byte offsets of the first `{` and its matching `}`.
fn first_brace_group(text: &str) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(open) = text.find('{') else {
        return Ok(None);
    };
    let mut depth = 0usize;
    for (offset, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some((open, open + offset)));
                }
            }
            _ => {}
        }
    }
    Err("unbalanced '{'")
}

/// The items of one brace group body: `a,b,{c,d}` or `007..012`.
fn brace_items(body: &str) -> Result<Vec<String>, String> {
    let alternatives = split_top_level_commas(body);
    if alternatives.len() > 1 {
        return Ok(alternatives.into_iter().map(str::to_owned).collect());
    }
    if let Some((start, end)) = body.split_once("..") {
        return numeric_range(start, end);
    }
    Err(format!(
        "'{{{body}}}' is neither a range like {{000..123}} nor alternatives like {{a,b}}"
    ))
}

fn split_top_level_commas(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (offset, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..offset]);
                start = offset + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

fn numeric_range(start: &str, end: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| -> Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("range bound '{s}' is not a non-negative integer"));
        }
        s.parse::<u64>()
            .map_err(|_| format!("range bound '{s}' is too large"))
    };
    let (first, last) = (parse(start)?, parse(end)?);
    if first.abs_diff(last) >= MAX_EXPANDED_PATHS as u64 {
        return Err(format!("range {start}..{end} has too many values"));
    }
    // Same rule as bash and braceexpand: a leading zero on either bound pads to the wider one.
    let zero_padded = |s: &str| s.len() > 1 && s.starts_with('0');
    let width = if zero_padded(start) || zero_padded(end) {
        start.len().max(end.len())
    } else {
        0
    };
    let values: Vec<u64> = if first <= last {
        (first..=last).collect()
    } else {
        (last..=first).rev().collect()
    };
    Ok(values.iter().map(|v| format!("{v:0width$}")).collect())
}

fn invalid(pattern: &str, reason: &str) -> ShardError {
    ShardError::InvalidPattern {
        pattern: pattern.to_owned(),
        reason: reason.to_owned(),
    }
}

fn too_many(pattern: &str) -> ShardError {
    invalid(
        pattern,
        &format!("expands to more than {MAX_EXPANDED_PATHS} paths"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("starkret-patterns-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn zero_padded_ranges_keep_their_width() {
        assert_eq!(
            expand_braces("s/{00008..00011}.tar").unwrap(),
            strings(&["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"])
        );
        assert_eq!(
            expand_braces("{8..10}").unwrap(),
            strings(&["8", "9", "10"])
        );
        assert_eq!(expand_braces("{3..1}").unwrap(), strings(&["3", "2", "1"]));
    }

    #[test]
    fn several_and_nested_groups_expand_left_slowest() {
        assert_eq!(
            expand_braces("{a,b}-{0..1}").unwrap(),
            strings(&["a-0", "a-1", "b-0", "b-1"])
        );
        assert_eq!(
            expand_braces("x{a,{b,c}d}").unwrap(),
            strings(&["xa", "xbd", "xcd"])
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), strings(&["plain.tar"]));
    }

    #[test]
    fn malformed_groups_are_errors_naming_the_pattern() {
        for bad in ["{00..01.tar", "{abc}.tar", "{1..x}", "{0..99999999999}"] {
            let err = expand_braces(bad).unwrap_err();
            assert!(
                matches!(&err, ShardError::InvalidPattern { pattern, .. } if pattern == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn expansions_past_their_memory_and_work_limits_are_errors() {
        // 2^19 paths of ~220 bytes: under the path count limit, over 64 MiB in all.
        let long = format!("{}{}", "{a,b}".repeat(19), "x".repeat(200));
        match expand_braces(&long) {
            Err(err) => assert!(err.to_string().contains("MiB of paths"), "{err}"),
            Ok(paths) => panic!("expanded to {} paths", paths.len()),
        }
        // A 4 KB pattern around {0..999999} would have built 4 GB of paths.
        let range = format!("{}{{0..999999}}", "y".repeat(4000));
        assert!(expand_braces(&range).is_err());
        // Few paths, but each copied once per group: 4096 paths x 300 groups x ~1 KB.
        let deep = format!("{}{}", "{a,b}".repeat(12), "{1..1}".repeat(300));
        match expand_braces(&deep) {
            Err(err) => assert!(err.to_string().contains("too many brace groups"), "{err}"),
            Ok(paths) => panic!("expanded to {} paths", paths.len()),
        }
        // Just under both limits still expands.
        assert_eq!(expand_braces("{0..999999}").unwrap().len(), 1_000_000);
    }

    #[test]
    fn globs_braces_and_plain_paths_resolve_to_files_in_order_without_repeats() {
        let dir = temp_dir("resolve");
        for name in [
            "a-000.tar",
            "a-001.tar",
            "a-002.tar",
            "b.tar",
            ".hidden.tar",
        ] {
            fs::write(dir.join(name), b"").unwrap();
        }
        fs::create_dir(dir.join("sub.tar")).unwrap();
        let d = dir.display();
        let paths = expand_shard_paths(&[
            format!("{d}/a-{{001..002}}.tar"),
            format!("{d}/*.tar"),
            format!("{d}/b.tar"),
        ])
        .unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a-001.tar", "a-002.tar", "a-000.tar", "b.tar"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_and_empty_globs_are_errors_naming_them() {
        let dir = temp_dir("missing");
        fs::write(dir.join("s-0.tar"), b"").unwrap();
        let d = dir.display();
        let range = format!("{d}/s-{{0..1}}.tar");
        assert_eq!(
            expand_shard_paths(std::slice::from_ref(&range)).unwrap_err(),
            ShardError::NotFound {
                pattern: range.clone(),
                path: dir.join("s-1.tar")
            }
        );
        let glob = format!("{d}/*.zip");
        let err = expand_shard_paths(std::slice::from_ref(&glob)).unwrap_err();
        assert_eq!(
            err,
            ShardError::NoMatch {
                pattern: glob.clone()
            }
        );
        assert!(err.to_string().contains(&glob));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_file_with_brace_characters_is_taken_literally() {
        let dir = temp_dir("literal");
        let odd = dir.join("{odd}[1].tar");
        fs::write(&odd, b"").unwrap();
        let paths = expand_shard_paths(&[odd.display().to_string()]).unwrap();
        assert_eq!(paths, [odd]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
