//! The metadata directory tree and its three renderings: the newline
//! listing, `?recursive=true` JSON (camelCase keys) and `alt=text`.
//!
//! Only metadata paths build a tree; the token and identity endpoints are
//! answered before any of this (see `super::GceApi::handle`).

use std::borrow::Cow;

use serde_json::{Map, Value as Json};

/// One node of the metadata tree.
#[derive(Debug, Clone)]
pub enum Value {
    /// A directory; entries in listing order (alphabetical, as GCE lists).
    Dir(Vec<Entry>),
    /// A string leaf.
    Text(Cow<'static, str>),
    /// A numeric leaf: digits as text, a number in JSON (`id`,
    /// `numeric-project-id`, as GCE renders them).
    Int(u64),
    /// A list leaf (`aliases`, `scopes`): one value per line as text, an
    /// array in JSON.
    Lines(Vec<Cow<'static, str>>),
    /// A credential endpoint (`token`, `identity`): listed, never rendered
    /// into a recursive answer, answered by its own handler.
    Credential,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// The path segment.
    pub name: Cow<'static, str>,
    /// The key in recursive JSON: camelCase of the segment for GCE's own
    /// keys; the name itself for user keys (attributes, account emails).
    pub json_key: Cow<'static, str>,
    pub value: Value,
}

impl Entry {
    /// A GCE-defined key: its JSON key is the camelCase of its name.
    pub fn key(name: &'static str, value: Value) -> Self {
        Self {
            name: Cow::Borrowed(name),
            json_key: camel_case(name),
            value,
        }
    }

    /// A user-defined key (an attribute, an account email): JSON keeps it.
    pub fn verbatim(name: impl Into<Cow<'static, str>>, value: Value) -> Self {
        let name = name.into();
        Self {
            json_key: name.clone(),
            name,
            value,
        }
    }
}

/// `numeric-project-id` → `numericProjectId`.
fn camel_case(name: &'static str) -> Cow<'static, str> {
    if !name.contains('-') {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

impl Value {
    /// The node at `segments` below this one.
    pub fn walk<'a>(&'a self, segments: &[Cow<'_, str>]) -> Option<&'a Value> {
        let mut node = self;
        for segment in segments {
            match node {
                Value::Dir(entries) => {
                    node = &entries.iter().find(|e| e.name == *segment)?.value;
                }
                _ => return None,
            }
        }
        Some(node)
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Value::Dir(_))
    }

    /// A directory's listing: one entry per line, subdirectories ending `/`.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        if let Value::Dir(entries) = self {
            for entry in entries {
                out.push_str(&entry.name);
                if entry.value.is_dir() {
                    out.push('/');
                }
                out.push('\n');
            }
        }
        out
    }

    /// A directory's listing as a JSON array (`?alt=json` without recursion).
    pub fn listing_json(&self) -> Json {
        let names = match self {
            Value::Dir(entries) => entries
                .iter()
                .map(|e| {
                    let mut name = e.name.to_string();
                    if e.value.is_dir() {
                        name.push('/');
                    }
                    Json::String(name)
                })
                .collect(),
            _ => Vec::new(),
        };
        Json::Array(names)
    }

    /// The recursive JSON form; credential endpoints are left out, so no
    /// token or identity ever appears in it.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Dir(entries) => {
                let mut map = Map::new();
                for entry in entries {
                    if matches!(entry.value, Value::Credential) {
                        continue;
                    }
                    map.insert(entry.json_key.to_string(), entry.value.to_json());
                }
                Json::Object(map)
            }
            Value::Text(s) => Json::String(s.to_string()),
            Value::Int(n) => Json::from(*n),
            Value::Lines(lines) => {
                Json::Array(lines.iter().map(|l| Json::String(l.to_string())).collect())
            }
            Value::Credential => Json::Null,
        }
    }

    /// A leaf as text: strings as they are, numbers in decimal, lists one
    /// value per line.
    pub fn leaf_text(&self) -> String {
        match self {
            Value::Text(s) => s.to_string(),
            Value::Int(n) => n.to_string(),
            Value::Lines(lines) => {
                let mut out = String::new();
                for line in lines {
                    out.push_str(line);
                    out.push('\n');
                }
                out
            }
            Value::Dir(_) | Value::Credential => String::new(),
        }
    }

    /// The recursive text form (`?recursive=true&alt=text`): one
    /// `path value` line per leaf, list items indexed (`scopes/0 …`).
    pub fn recursive_text(&self) -> String {
        let mut out = String::new();
        self.flatten("", &mut out);
        out
    }

    fn flatten(&self, prefix: &str, out: &mut String) {
        let mut line = |path: &str, value: &str| {
            out.push_str(path);
            out.push(' ');
            out.push_str(value);
            out.push('\n');
        };
        match self {
            Value::Dir(entries) => {
                for entry in entries {
                    let path = if prefix.is_empty() {
                        entry.name.to_string()
                    } else {
                        format!("{prefix}/{}", entry.name)
                    };
                    entry.value.flatten(&path, out);
                }
            }
            Value::Text(s) => line(prefix, s),
            Value::Int(n) => line(prefix, &n.to_string()),
            Value::Lines(lines) => {
                for (i, l) in lines.iter().enumerate() {
                    line(&format!("{prefix}/{i}"), l);
                }
            }
            Value::Credential => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_of_gce_keys() {
        assert_eq!(camel_case("numeric-project-id"), "numericProjectId");
        assert_eq!(camel_case("service-accounts"), "serviceAccounts");
        assert_eq!(camel_case("email"), "email");
    }

    #[test]
    fn renderings() {
        let tree = Value::Dir(vec![
            Entry::verbatim(
                "attributes",
                Value::Dir(vec![Entry::verbatim(
                    "cluster-name",
                    Value::Text("prod".into()),
                )]),
            ),
            Entry::key("id", Value::Int(7)),
            Entry::key("scopes", Value::Lines(vec!["a".into(), "b".into()])),
            Entry::key("token", Value::Credential),
        ]);
        assert_eq!(tree.listing(), "attributes/\nid\nscopes\ntoken\n");
        assert_eq!(
            tree.to_json().to_string(),
            r#"{"attributes":{"cluster-name":"prod"},"id":7,"scopes":["a","b"]}"#
        );
        assert_eq!(
            tree.recursive_text(),
            "attributes/cluster-name prod\nid 7\nscopes/0 a\nscopes/1 b\n"
        );
        assert_eq!(
            tree.listing_json().to_string(),
            r#"["attributes/","id","scopes","token"]"#
        );
        let seg = |s: &'static str| Cow::Borrowed(s);
        assert_eq!(
            tree.walk(&[seg("attributes"), seg("cluster-name")])
                .unwrap()
                .leaf_text(),
            "prod"
        );
        assert!(tree.walk(&[seg("id"), seg("x")]).is_none());
        assert_eq!(tree.walk(&[seg("scopes")]).unwrap().leaf_text(), "a\nb\n");
    }
}
