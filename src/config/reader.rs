//! A typed reader over the spanned TOML tree, with the environment laid on top.
//!
//! serde stops at the first problem; an operator fixing a config wants all of them at
//! once, each with its place. So the raw document is parsed into toml's spanned tree and
//! read key by key: every value is taken through a typed accessor that records a
//! [`Problem`] (with `FILE:LINE:COL`, or the environment variable at fault) instead of
//! failing, and every key no accessor asked for is reported as unknown.
//!
//! Environment overrides: `SWARMGATE_<SECTION>_<KEY>` (upper case, `.`/`-` as `_`) wins
//! over the file. Each variable used is remembered so that unknown `SWARMGATE_*`
//! variables can be reported too.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One thing wrong with the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `FILE:LINE:COL`, or `env SWARMGATE_...`.
    pub location: String,
    pub message: String,
    /// Byte offset in the file, for ordering; environment problems sort last.
    pub(crate) order: usize,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Where a setting was written (`FILE:LINE:COL`, or `env SWARMGATE_...`), kept with it for
/// problems that only checks after reading can find (a directory that cannot be written,
/// a wildcard route no certificate covers).
#[derive(Debug, Clone, Default)]
pub struct At {
    location: String,
    order: usize,
}

impl At {
    pub fn problem(&self, message: impl Into<String>) -> Problem {
        Problem { location: self.location.clone(), message: message.into(), order: self.order }
    }
}

/// Where a value came from; turns into a [`Problem`] location.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    File(Range<usize>),
    Env(String),
    /// The key was absent: the problem is reported at its table.
    Default(Range<usize>),
}

/// The document, the environment, and the problems found so far.
pub(super) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub env: &'a BTreeMap<String, String>,
    problems: RefCell<Vec<Problem>>,
    used_env: RefCell<BTreeSet<String>>,
}

impl<'a> Source<'a> {
    pub(super) fn new(file: &'a str, text: &'a str, env: &'a BTreeMap<String, String>) -> Self {
        Source { file, text, env, problems: RefCell::new(Vec::new()), used_env: RefCell::new(BTreeSet::new()) }
    }

    /// `FILE:LINE:COL` of a byte offset (1-based line and column, columns in characters).
    pub(super) fn position(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        format!("{}:{}:{}", self.file, line, col)
    }

    pub(super) fn problem(&self, origin: &Origin, message: impl Into<String>) {
        let problem = self.at(origin).problem(message);
        self.problems.borrow_mut().push(problem);
    }

    /// Where `origin` is, kept for problems found after the config is read.
    pub(super) fn at(&self, origin: &Origin) -> At {
        match origin {
            Origin::File(span) | Origin::Default(span) => At { location: self.position(span.start), order: span.start },
            Origin::Env(var) => At { location: format!("env {var}"), order: usize::MAX },
        }
    }

    pub(super) fn env_var(&self, name: &str) -> Option<&'a str> {
        let value = self.env.get(name)?;
        self.used_env.borrow_mut().insert(name.to_string());
        Some(value.as_str())
    }

    pub(super) fn used_env(&self) -> BTreeSet<String> {
        self.used_env.borrow().clone()
    }

    pub(super) fn has_problems(&self) -> bool {
        !self.problems.borrow().is_empty()
    }

    pub(super) fn into_problems(self) -> Vec<Problem> {
        let mut problems = self.problems.into_inner();
        problems.sort_by_key(|p| p.order);
        problems
    }
}

/// A raw scalar: a TOML value, or the text of an environment variable.
pub(super) enum Raw<'t, 'i> {
    Toml(&'t DeValue<'i>),
    Env(&'t str),
}

/// One TOML table being read, with the environment prefix of its keys.
pub(super) struct Table<'s, 't, 'i> {
    src: &'s Source<'s>,
    table: Option<&'t DeTable<'i>>,
    span: Range<usize>,
    /// e.g. `SWARMGATE_LISTEN_`; `None` where keys have no environment form.
    env_prefix: Option<String>,
    /// The name shown in messages, e.g. `[listen]`.
    pub name: TableName,
    /// Keys asked for so far.
    seen: RefCell<Asked>,
}

/// The keys a table was asked for. A table has a handful, so they are kept inline: a
/// 10,000-route config would otherwise allocate a list per route on every reload.
#[derive(Default)]
struct Asked {
    inline: [&'static str; 16],
    len: usize,
    more: Vec<&'static str>,
}

impl Asked {
    fn push(&mut self, key: &'static str) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = key;
                self.len += 1;
            }
            None => self.more.push(key),
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.inline[..self.len].contains(&key) || self.more.contains(&key)
    }
}

/// A table's name in messages, made only when a message needs it: a config with
/// 10,000 routes would otherwise format 10,000 names on every reload.
pub(super) enum TableName {
    Text(String),
    /// `[[KEY]] #N`: the Nth table (1-based) of an array of tables.
    Item(&'static str, usize),
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableName::Text(s) => f.write_str(s),
            TableName::Item(key, n) => write!(f, "[[{key}]] #{n}"),
        }
    }
}

impl From<String> for TableName {
    fn from(s: String) -> Self {
        TableName::Text(s)
    }
}

impl From<&str> for TableName {
    fn from(s: &str) -> Self {
        TableName::Text(s.to_string())
    }
}

impl<'s, 't, 'i> Table<'s, 't, 'i> {
    pub(super) fn new(
        src: &'s Source<'s>,
        table: Option<&'t DeTable<'i>>,
        span: Range<usize>,
        env_prefix: Option<String>,
        name: impl Into<TableName>,
    ) -> Self {
        Table { src, table, span, env_prefix, name: name.into(), seen: RefCell::default() }
    }

    pub(super) fn source(&self) -> &'s Source<'s> {
        self.src
    }

    pub(super) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// Whether the table is in the file at all.
    pub(super) fn present(&self) -> bool {
        self.table.is_some()
    }

    fn env_name(&self, key: &str) -> Option<String> {
        self.env_prefix.as_ref().map(|p| format!("{p}{}", key.to_ascii_uppercase()))
    }

    /// The raw value of `key`: the environment first, then the file.
    pub(super) fn raw(&self, key: &'static str) -> Option<(Raw<'t, 'i>, Origin)>
    where
        's: 't,
    {
        self.seen.borrow_mut().push(key);
        if let Some(var) = self.env_name(key) {
            if let Some(text) = self.src.env_var(&var) {
                return Some((Raw::Env(text), Origin::Env(var)));
            }
        }
        let value = find(self.table?, key)?;
        Some((Raw::Toml(value.get_ref()), Origin::File(value.span())))
    }

    /// A spanned sub-table (inline or not); a wrong type is a problem.
    pub(super) fn table(&self, key: &'static str) -> Option<(&'t DeTable<'i>, Range<usize>)> {
        self.seen.borrow_mut().push(key);
        let value: &'t Spanned<DeValue<'i>> = find(self.table?, key)?;
        match value.get_ref() {
            DeValue::Table(t) => Some((t, value.span())),
            _ => {
                self.src.problem(&Origin::File(value.span()), format!("{}.{key} must be a table", self.name));
                None
            }
        }
    }

    /// A spanned array of tables (`[[route]]`).
    pub(super) fn array_of_tables(&self, key: &'static str) -> Vec<(&'t DeTable<'i>, Range<usize>)> {
        self.seen.borrow_mut().push(key);
        let Some(value) = self.table.and_then(|t| t.get(key)) else {
            return Vec::new();
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.src.problem(&Origin::File(value.span()), format!("{key} must be an array of tables ([[{key}]])"));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::Table(t) => out.push((t, item.span())),
                _ => self.src.problem(&Origin::File(item.span()), format!("each {key} must be a table")),
            }
        }
        out
    }

    /// Reads `key` with `parse`, or `default` when absent. A parse failure is recorded
    /// and `default` is returned so that reading goes on.
    pub(super) fn get<T>(
        &self,
        key: &'static str,
        default: T,
        parse: impl FnOnce(Raw<'t, 'i>) -> Result<T, String>,
    ) -> T
    where
        's: 't,
    {
        self.get_with_origin(key, default, parse).0
    }

    pub(super) fn get_with_origin<T>(
        &self,
        key: &'static str,
        default: T,
        parse: impl FnOnce(Raw<'t, 'i>) -> Result<T, String>,
    ) -> (T, Origin)
    where
        's: 't,
    {
        match self.raw(key) {
            None => (default, Origin::Default(self.span.clone())),
            Some((raw, origin)) => match parse(raw) {
                Ok(v) => (v, origin),
                Err(msg) => {
                    self.src.problem(&origin, format!("{}.{key}: {msg}", self.name));
                    (default, origin)
                }
            },
        }
    }

    /// A string value, borrowed from the document or the environment.
    pub(super) fn str(&self, key: &'static str, default: &'t str) -> (&'t str, Origin)
    where
        's: 't,
    {
        self.get_with_origin(key, default, as_str)
    }

    pub(super) fn string(&self, key: &'static str, default: &'t str) -> (String, Origin)
    where
        's: 't,
    {
        let (s, origin) = self.str(key, default);
        (s.to_string(), origin)
    }

    pub(super) fn bool(&self, key: &'static str, default: bool) -> bool
    where
        's: 't,
    {
        self.get(key, default, as_bool)
    }

    pub(super) fn u64(&self, key: &'static str, default: u64) -> u64
    where
        's: 't,
    {
        self.u64_with_origin(key, default).0
    }

    /// A whole number and where it came from, for checks of its range.
    pub(super) fn u64_with_origin(&self, key: &'static str, default: u64) -> (u64, Origin)
    where
        's: 't,
    {
        self.get_with_origin(key, default, as_u64)
    }

    pub(super) fn duration(&self, key: &'static str, default: std::time::Duration) -> std::time::Duration
    where
        's: 't,
    {
        self.duration_with_origin(key, default).0
    }

    /// A duration and where it came from, for checks of its range.
    pub(super) fn duration_with_origin(
        &self,
        key: &'static str,
        default: std::time::Duration,
    ) -> (std::time::Duration, Origin)
    where
        's: 't,
    {
        self.get_with_origin(key, default, |raw| as_str(raw).and_then(super::duration::parse))
    }

    pub(super) fn list(&self, key: &'static str) -> (Vec<String>, Origin)
    where
        's: 't,
    {
        self.get_with_origin(key, Vec::new(), as_list)
    }

    /// Reports every key of the table that no accessor asked for.
    pub(super) fn finish(&self) {
        let Some(table) = self.table else { return };
        let seen = self.seen.borrow();
        for (key, _) in table.iter() {
            if !seen.contains(key.get_ref()) {
                self.src
                    .problem(&Origin::File(key.span()), format!("unknown key {:?} in {}", key.get_ref(), self.name));
            }
        }
    }
}

/// The value of `key` in `table`. A table of a few keys (a route's) is scanned: hashing
/// the key cost more than comparing it with each, for 40,000 lookups in a reload of
/// 10,000 routes.
fn find<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
    if table.len() <= 8 { table.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v) } else { table.get(key) }
}

pub(super) fn as_str<'r>(raw: Raw<'r, '_>) -> Result<&'r str, String> {
    match raw {
        Raw::Env(s) => Ok(s),
        Raw::Toml(DeValue::String(s)) => Ok(s),
        Raw::Toml(other) => Err(format!("expected a string, found {}", kind(other))),
    }
}

pub(super) fn as_bool(raw: Raw<'_, '_>) -> Result<bool, String> {
    match raw {
        Raw::Env("true" | "1") => Ok(true),
        Raw::Env("false" | "0") => Ok(false),
        Raw::Env(s) => Err(format!("expected true or false, found {s:?}")),
        Raw::Toml(DeValue::Boolean(b)) => Ok(*b),
        Raw::Toml(other) => Err(format!("expected true or false, found {}", kind(other))),
    }
}

pub(super) fn as_u64(raw: Raw<'_, '_>) -> Result<u64, String> {
    match raw {
        Raw::Env(s) => s.trim().parse().map_err(|_| format!("expected a whole number, found {s:?}")),
        Raw::Toml(DeValue::Integer(i)) => u64::from_str_radix(i.as_str(), i.radix())
            .map_err(|_| format!("expected a whole number >= 0, found {}", i.as_str())),
        Raw::Toml(other) => Err(format!("expected a whole number, found {}", kind(other))),
    }
}

/// A list of strings; from the environment, comma-separated.
pub(super) fn as_list(raw: Raw<'_, '_>) -> Result<Vec<String>, String> {
    match raw {
        Raw::Env(s) => Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()),
        Raw::Toml(DeValue::Array(items)) => items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok(s.to_string()),
                other => Err(format!("expected a list of strings, found {} in it", kind(other))),
            })
            .collect(),
        Raw::Toml(other) => Err(format!("expected a list of strings, found {}", kind(other))),
    }
}

fn kind(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_keys_past_the_inline_room_are_kept() {
        const KEYS: [&str; 20] =
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"];
        let mut asked = Asked::default();
        for key in KEYS {
            asked.push(key);
        }
        assert!(KEYS.iter().all(|k| asked.contains(k)));
        assert!(!asked.contains("u") && !asked.contains(""));
    }
}
