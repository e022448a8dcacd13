//! Authorization objects (`authz-simple`, `authz-list`, `authz-list-file`) deciding whether
//! an identity (a client certificate's distinguished name) may connect.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Policy {
    Allow,
    Deny,
}

#[derive(Debug)]
struct Rule {
    pattern: String,
    policy: Policy,
    glob: bool,
}

/// An ordered rule list: the first matching rule decides, else the default policy.
#[derive(Debug)]
struct RuleList {
    policy: Policy,
    rules: Vec<Rule>,
}

/// What identifies the version of a rules file we loaded.
type FileStamp = (SystemTime, u64, u64);

#[derive(Debug)]
struct FileState {
    stamp: Option<FileStamp>,
    /// The rules, or why the last (re)load failed: then everyone is denied, as in QEMU.
    rules: Result<RuleList, String>,
}

#[derive(Debug)]
enum Kind {
    Simple(String),
    List(RuleList),
    ListFile {
        path: PathBuf,
        refresh: bool,
        state: Mutex<FileState>,
    },
}

/// A loaded authorization object.
#[derive(Debug)]
pub struct Authz(Kind);

impl Authz {
    /// Builds the object of QOM type `qom_type` from its (schema-checked) properties.
    pub fn from_props(qom_type: &str, props: &Map<String, Value>) -> Result<Authz, String> {
        match qom_type {
            "authz-simple" => {
                let identity = props
                    .get("identity")
                    .and_then(Value::as_str)
                    .ok_or("Parameter 'identity' is missing")?;
                Ok(Authz(Kind::Simple(identity.to_string())))
            }
            "authz-list" => Ok(Authz(Kind::List(parse_list(props, "")?))),
            "authz-list-file" => {
                let path = props
                    .get("filename")
                    .and_then(Value::as_str)
                    .ok_or("Parameter 'filename' is missing")?;
                let path = PathBuf::from(path);
                // QEMU watches the file with inotify unless refresh=off; we compare its
                // stamp on each check instead.
                let refresh = props
                    .get("refresh")
                    .map(|v| as_bool(v, "refresh"))
                    .transpose()?
                    .unwrap_or(true);
                let (stamp, rules) = load_file(&path)?;
                Ok(Authz(Kind::ListFile {
                    path,
                    refresh,
                    state: Mutex::new(FileState {
                        stamp: Some(stamp),
                        rules: Ok(rules),
                    }),
                }))
            }
            other => Err(format!(
                "authorization type '{other}' is not supported by blkd"
            )),
        }
    }

    /// Whether `identity` is allowed. An error (a rules file that cannot be read) denies.
    pub fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        match &self.0 {
            Kind::Simple(allowed) => Ok(allowed == identity),
            Kind::List(list) => Ok(list.allows(identity)),
            Kind::ListFile {
                path,
                refresh,
                state,
            } => {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                if *refresh {
                    let current = stamp_of(path).ok();
                    if current.is_none() || current != state.stamp {
                        match load_file(path) {
                            Ok((stamp, rules)) => {
                                log::info!("reloaded authorization rules from {}", path.display());
                                state.stamp = Some(stamp);
                                state.rules = Ok(rules);
                            }
                            Err(e) => {
                                state.stamp = None;
                                state.rules = Err(e);
                            }
                        }
                    }
                }
                match &state.rules {
                    Ok(list) => Ok(list.allows(identity)),
                    Err(e) => Err(e.clone()),
                }
            }
        }
    }
}

impl RuleList {
    fn allows(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|rule| {
                if rule.glob {
                    glob_match(&rule.pattern, identity)
                } else {
                    rule.pattern == identity
                }
            })
            .map_or(self.policy, |rule| rule.policy);
        policy == Policy::Allow
    }
}

fn as_bool(value: &Value, name: &str) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if matches!(s.as_str(), "on" | "yes" | "true") => Ok(true),
        Value::String(s) if matches!(s.as_str(), "off" | "no" | "false") => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

fn parse_policy(value: Option<&Value>, name: &str) -> Result<Option<Policy>, String> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) if s == "allow" => Ok(Some(Policy::Allow)),
        Some(Value::String(s)) if s == "deny" => Ok(Some(Policy::Deny)),
        Some(Value::String(s)) => Err(format!("Parameter '{name}' does not accept value '{s}'")),
        Some(_) => Err(format!(
            "Invalid parameter type for '{name}', expected: string"
        )),
    }
}

/// Parses `{policy, rules: [{match, policy, format}]}`; `prefix` qualifies names in errors.
fn parse_list(props: &Map<String, Value>, prefix: &str) -> Result<RuleList, String> {
    let policy =
        parse_policy(props.get("policy"), &format!("{prefix}policy"))?.unwrap_or(Policy::Deny);
    let rules = match props.get("rules") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_rule(item, &format!("{prefix}rules[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(format!(
                "Invalid parameter type for '{prefix}rules', expected: array"
            ))
        }
    };
    Ok(RuleList { policy, rules })
}

fn parse_rule(item: &Value, name: &str) -> Result<Rule, String> {
    let Value::Object(rule) = item else {
        return Err(format!(
            "Invalid parameter type for '{name}', expected: object"
        ));
    };
    let pattern = match rule.get("match") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(format!(
                "Invalid parameter type for '{name}.match', expected: string"
            ))
        }
        None => return Err(format!("Parameter '{name}.match' is missing")),
    };
    let policy = parse_policy(rule.get("policy"), &format!("{name}.policy"))?
        .ok_or_else(|| format!("Parameter '{name}.policy' is missing"))?;
    let glob = match rule.get("format") {
        None => false,
        Some(Value::String(s)) if s == "exact" => false,
        Some(Value::String(s)) if s == "glob" => true,
        Some(other) => {
            return Err(format!(
                "Parameter '{name}.format' does not accept value '{}'",
                other.as_str().unwrap_or(&other.to_string())
            ))
        }
    };
    Ok(Rule {
        pattern,
        policy,
        glob,
    })
}

fn stamp_of(path: &std::path::Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len(), meta.ino()))
}

/// Reads a rules file: a JSON object like authz-list's properties.
fn load_file(path: &std::path::Path) -> Result<(FileStamp, RuleList), String> {
    let unreadable = |e: std::io::Error| {
        format!(
            "Unable to read authorization rules file '{}': {e}",
            path.display()
        )
    };
    let stamp = stamp_of(path).map_err(unreadable)?;
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "Unable to parse authorization rules file '{}': {e}",
            path.display()
        )
    })?;
    let Value::Object(props) = value else {
        return Err(format!(
            "Authorization rules file '{}' must contain a JSON object",
            path.display()
        ));
    };
    let list = parse_list(&props, "")
        .map_err(|e| format!("Authorization rules file '{}': {e}", path.display()))?;
    Ok((stamp, list))
}

/// GLib's `g_pattern_match_simple`: `*` matches any run of characters, `?` any one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is currently made to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if *c == '?' || Some(c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test props are objects"),
        }
    }

    #[test]
    fn glob_matches_like_glib() {
        assert!(glob_match(
            "*CN=qsd-client*",
            "C=GB,O=QSD Test,CN=qsd-client"
        ));
        assert!(glob_match("C=??,*", "C=GB,O=X"));
        assert!(!glob_match("C=?,*", "C=GB,O=X"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("a**", "a"));
        assert!(!glob_match("", "a"));
        assert!(glob_match("*é", "café"));
        assert!(!glob_match("*CN=qsd-client", "C=GB,CN=qsd-client2"));
    }

    #[test]
    fn simple_is_exact() {
        let a = Authz::from_props(
            "authz-simple",
            &props(json!({"identity": "C=GB,O=QSD Test,CN=qsd-client"})),
        )
        .unwrap();
        assert_eq!(a.is_allowed("C=GB,O=QSD Test,CN=qsd-client"), Ok(true));
        assert_eq!(a.is_allowed("CN=qsd-client,O=QSD Test,C=GB"), Ok(false));
        assert_eq!(
            Authz::from_props("authz-simple", &Map::new()).unwrap_err(),
            "Parameter 'identity' is missing"
        );
    }

    #[test]
    fn list_first_match_wins_then_default() {
        let a = Authz::from_props(
            "authz-list",
            &props(json!({"policy": "allow", "rules": [
                {"match": "*CN=evil*", "policy": "deny", "format": "glob"},
                {"match": "CN=evil-but-ok", "policy": "allow"},
            ]})),
        )
        .unwrap();
        assert_eq!(a.is_allowed("CN=evil-but-ok"), Ok(false));
        assert_eq!(a.is_allowed("O=X,CN=evil"), Ok(false));
        assert_eq!(a.is_allowed("O=X,CN=good"), Ok(true));
        let deny_default = Authz::from_props(
            "authz-list",
            &props(json!({"rules": [
                {"match": "CN=a", "policy": "allow", "format": "exact"}]})),
        )
        .unwrap();
        assert_eq!(deny_default.is_allowed("CN=a"), Ok(true));
        assert_eq!(deny_default.is_allowed("CN=*"), Ok(false));
        let err = Authz::from_props(
            "authz-list",
            &props(json!({"rules": [{"policy": "allow"}]})),
        )
        .unwrap_err();
        assert_eq!(err, "Parameter 'rules[0].match' is missing");
    }

    #[test]
    fn list_file_reloads_and_fails_closed() {
        let dir = std::env::temp_dir().join(format!("blkd-authz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.json");
        std::fs::write(
            &file,
            r#"{"policy": "deny", "rules": [{"match": "CN=a", "policy": "allow"}]}"#,
        )
        .unwrap();
        let p = props(json!({"filename": file.to_str().unwrap()}));
        let a = Authz::from_props("authz-list-file", &p).unwrap();
        assert_eq!(a.is_allowed("CN=a"), Ok(true));
        assert_eq!(a.is_allowed("CN=b"), Ok(false));
        // A different length guarantees a new stamp even within the mtime granularity.
        std::fs::write(
            &file,
            r#"{"policy": "deny", "rules": [{"match": "CN=b", "policy": "allow", "format": "glob"}]}"#,
        )
        .unwrap();
        assert_eq!(a.is_allowed("CN=a"), Ok(false));
        assert_eq!(a.is_allowed("CN=b"), Ok(true));
        std::fs::write(&file, "not json").unwrap();
        assert!(a
            .is_allowed("CN=b")
            .unwrap_err()
            .contains("Unable to parse"));
        std::fs::remove_file(&file).unwrap();
        assert!(a.is_allowed("CN=b").unwrap_err().contains("Unable to read"));
        let missing = Authz::from_props("authz-list-file", &p).unwrap_err();
        assert!(missing.contains("rules.json"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
