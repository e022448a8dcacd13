//! The QAPI-like schema that drives both argument validation and
//! `query-qmp-schema`.
//!
//! # Source format
//!
//! The source is a JSON array of definitions, written like QEMU's own
//! `qapi/*.json` files (but with double quotes). Lines whose first
//! non-blank character is `#` are comments. Every definition may carry
//! `"features": [...]` and a `"doc"` string (ignored).
//!
//! ```text
//! {"enum": "BlockExportRemoveMode", "data": ["safe", "hard"]}
//! {"struct": "BlockDirtyBitmap", "data": {"node": "str", "name": "str"}}
//! {"struct": "BlockExportOptionsNbd", "base": "BlockExportOptionsNbdBase",
//!  "data": {"*bitmaps": ["BlockDirtyBitmapOrStr"], "*allocation-depth": "bool"}}
//! {"union": "BlockExportOptions",
//!  "base": {"type": "BlockExportType", "id": "str", ...},    (or a struct name)
//!  "discriminator": "type",
//!  "data": {"nbd": "BlockExportOptionsNbd", "vhost-user-blk": "..."}}
//! {"alternate": "BlockDirtyBitmapOrStr", "data": {"local": "str", "external": "BlockDirtyBitmap"}}
//! {"command": "block-export-add", "data": "BlockExportOptions", "boxed": true}
//! {"command": "block-export-del", "data": {"id": "str", "*mode": "BlockExportRemoveMode"}}
//! {"command": "query-block-exports", "returns": ["BlockExportInfo"]}
//! {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "str"}}
//! ```
//!
//! * Members: `"name": TYPE` is required, `"*name": TYPE` optional;
//!   `"name": {"type": TYPE, "features": [...]}` adds member features.
//! * `TYPE` is a type name or `["T"]` for an array of `T`.
//! * Built-in types: `str`, `int`, `int8`, `int16`, `int32`, `int64`,
//!   `uint8`, `uint16`, `uint32`, `uint64`, `size`, `number`, `bool`, `any`,
//!   `null`. Integer widths are checked on input (`Parameter 'x' expects
//!   uint16_t`); introspection shows every integer as `int`, like QEMU.
//! * Enum values may be `{"name": "v", "features": [...]}`.
//! * Unions are QEMU's flat unions: the discriminator is an enum member of
//!   the base; a value without a branch has no further members.
//! * Commands: `data` is an inline member list or the name of a struct or
//!   union (QAPI's `"boxed": true` is accepted with a name and means nothing
//!   more here); `returns` is optional; `"allow-oob": true` lets the command
//!   run with `exec-oob`.
//!
//! # Introspection
//!
//! [`Schema::introspect`] produces QEMU's `query-qmp-schema` reply:
//! commands and events in definition order, then every type they use in
//! order of first use, with type names other than built-ins and arrays
//! masked as `"0"`, `"1"`, ... exactly as QEMU's `introspect.py` does.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::visit::{InputMode, Visitor};

pub(crate) type TypeId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntKind {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
}

impl IntKind {
    pub fn signed(self) -> bool {
        matches!(
            self,
            IntKind::I8 | IntKind::I16 | IntKind::I32 | IntKind::I64
        )
    }

    /// The inclusive range and the C type name QEMU reports on overflow.
    pub fn range(self) -> Option<(i128, i128, &'static str)> {
        Some(match self {
            IntKind::I8 => (i8::MIN as i128, i8::MAX as i128, "int8_t"),
            IntKind::I16 => (i16::MIN as i128, i16::MAX as i128, "int16_t"),
            IntKind::I32 => (i32::MIN as i128, i32::MAX as i128, "int32_t"),
            IntKind::U8 => (0, u8::MAX as i128, "uint8_t"),
            IntKind::U16 => (0, u16::MAX as i128, "uint16_t"),
            IntKind::U32 => (0, u32::MAX as i128, "uint32_t"),
            IntKind::I64 | IntKind::U64 => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Builtin {
    Str,
    Int(IntKind),
    Size,
    Number,
    Bool,
    Any,
    Null,
}

impl Builtin {
    fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int(_) | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Any => "value",
            Builtin::Null => "null",
        }
    }
}

const BUILTINS: &[(&str, Builtin)] = &[
    ("str", Builtin::Str),
    ("int", Builtin::Int(IntKind::I64)),
    ("int8", Builtin::Int(IntKind::I8)),
    ("int16", Builtin::Int(IntKind::I16)),
    ("int32", Builtin::Int(IntKind::I32)),
    ("int64", Builtin::Int(IntKind::I64)),
    ("uint8", Builtin::Int(IntKind::U8)),
    ("uint16", Builtin::Int(IntKind::U16)),
    ("uint32", Builtin::Int(IntKind::U32)),
    ("uint64", Builtin::Int(IntKind::U64)),
    ("size", Builtin::Size),
    ("number", Builtin::Number),
    ("bool", Builtin::Bool),
    ("any", Builtin::Any),
    ("null", Builtin::Null),
];

#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub name: String,
    pub ty: TypeId,
    pub optional: bool,
    pub features: Vec<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Variants {
    pub tag: String,
    pub cases: Vec<(String, TypeId)>,
}

#[derive(Clone, Debug)]
pub(crate) struct EnumValue {
    pub name: String,
    pub features: Vec<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Builtin(Builtin),
    Enum(Vec<EnumValue>),
    /// Struct or flat union; `members` includes the base's.
    Object {
        members: Vec<Member>,
        variants: Option<Variants>,
    },
    Alternate(Vec<(String, TypeId)>),
    Array(TypeId),
}

#[derive(Clone, Debug)]
pub(crate) struct TypeDef {
    pub name: String,
    pub kind: Kind,
    pub features: Vec<String>,
}

#[derive(Clone, Debug)]
enum EntityKind {
    Command {
        arg: Option<TypeId>,
        ret: Option<TypeId>,
        allow_oob: bool,
    },
    Event {
        arg: Option<TypeId>,
    },
}

#[derive(Clone, Debug)]
struct Entity {
    name: String,
    kind: EntityKind,
    features: Vec<String>,
}

/// A loaded schema.
#[derive(Debug)]
pub struct Schema {
    pub(crate) types: Vec<TypeDef>,
    by_name: HashMap<String, TypeId>,
    entities: Vec<Entity>,
    commands: HashMap<String, usize>,
    events: HashMap<String, usize>,
    empty: TypeId,
    introspection: Value,
}

/// The JSON category an alternate dispatches on (QEMU's `QType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QType {
    String,
    Number,
    Bool,
    Null,
    Dict,
    List,
}

pub(crate) fn qtype_of(v: &Value) -> QType {
    match v {
        Value::String(_) => QType::String,
        Value::Number(_) => QType::Number,
        Value::Bool(_) => QType::Bool,
        Value::Null => QType::Null,
        Value::Object(_) => QType::Dict,
        Value::Array(_) => QType::List,
    }
}

impl Schema {
    /// Loads a schema from its source text (see the module documentation).
    pub fn from_source(source: &str) -> Result<Schema, String> {
        // Blank out comment lines, keeping line numbers for error messages.
        let text: String = source
            .lines()
            .map(|l| {
                if l.trim_start().starts_with('#') {
                    ""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let defs: Value = serde_json::from_str(&text).map_err(|e| format!("schema: {e}"))?;
        // serde_json keeps the last of duplicate keys; QEMU's parser refuses them.
        crate::json::from_str(&text).map_err(|e| format!("schema: {e}"))?;
        let Value::Array(defs) = defs else {
            return Err("schema: the top level must be an array of definitions".into());
        };
        Builder::default().build(defs)
    }

    pub(crate) fn ty(&self, id: TypeId) -> &TypeDef {
        &self.types[id]
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<TypeId> {
        self.by_name.get(name).copied()
    }

    /// `query-qmp-schema`'s return value.
    pub fn introspect(&self) -> Value {
        self.introspection.clone()
    }

    /// Command names in the order QSD's `query-commands` lists them (the
    /// reverse of definition order, as QEMU registers them).
    pub fn command_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .entities
            .iter()
            .filter(|e| matches!(e.kind, EntityKind::Command { .. }))
            .map(|e| e.name.as_str())
            .collect();
        names.reverse();
        names
    }

    /// `query-commands`' return value: `[{"name": ...}, ...]`.
    pub fn query_commands(&self) -> Value {
        Value::Array(
            self.command_names()
                .into_iter()
                .map(|n| json!({ "name": n }))
                .collect(),
        )
    }

    /// Whether `name` is a command of this schema.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Whether `name` is an event of this schema.
    pub fn has_event(&self, name: &str) -> bool {
        self.events.contains_key(name)
    }

    /// Whether the command may be run with `exec-oob`.
    pub fn command_allows_oob(&self, name: &str) -> bool {
        match self.commands.get(name).map(|&i| &self.entities[i].kind) {
            Some(EntityKind::Command { allow_oob, .. }) => *allow_oob,
            _ => false,
        }
    }

    /// Checks a command's `arguments` as QEMU's QMP marshaller does, and
    /// returns them converted to their schema types (integers wrapped or
    /// checked to width, members in input order). Defaults are not added.
    pub fn validate_command_args(
        &self,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Map<String, Value>, String> {
        let Some(&idx) = self.commands.get(command) else {
            return Err(format!("The command {command} has not been found"));
        };
        let EntityKind::Command { arg, .. } = &self.entities[idx].kind else {
            unreachable!()
        };
        let ty = arg.unwrap_or(self.empty);
        let root = Value::Object(args);
        match self.run_visitor(ty, &root, InputMode::Json)? {
            Value::Object(map) => Ok(map),
            _ => unreachable!("argument types are objects"),
        }
    }

    /// Checks `value` against the named type (for command-line options:
    /// `BlockdevOptions`, `BlockExportOptions`, `NbdServerOptions`,
    /// `ObjectOptions`) and returns it converted to its schema types. In
    /// [`InputMode::Keyval`] every scalar is a string to be parsed (`on`/`off`,
    /// `4k`, `0x10`); in [`InputMode::Json`] JSON types must match.
    pub fn visit_type(
        &self,
        type_name: &str,
        value: Value,
        mode: InputMode,
    ) -> Result<Value, String> {
        let Some(ty) = self.lookup(type_name) else {
            return Err(format!("unknown schema type '{type_name}'"));
        };
        self.run_visitor(ty, &value, mode)
    }

    /// Runs the visitor; deeply nested input (up to the 1024 levels the JSON
    /// parser lets through, e.g. `BlockdevRef` inside `BlockdevRef`) gets a
    /// helper thread with a large stack, since the recursion needs several
    /// KiB per level in debug builds.
    fn run_visitor(&self, ty: TypeId, root: &Value, mode: InputMode) -> Result<Value, String> {
        const INLINE_DEPTH: usize = 32;
        const DEEP_STACK: usize = 64 << 20;
        if nesting_depth(root) <= INLINE_DEPTH {
            return Visitor::new(self, root, mode).visit_root(ty);
        }
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("qmp-visit".into())
                .stack_size(DEEP_STACK)
                .spawn_scoped(scope, || Visitor::new(self, root, mode).visit_root(ty));
            match spawned {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                Err(_) => Visitor::new(self, root, mode).visit_root(ty),
            }
        })
    }

    /// The member names of an object type, base members first (empty for
    /// other types). Branch members of unions are not included.
    pub fn member_names(&self, type_name: &str) -> Vec<&str> {
        match self.lookup(type_name).map(|t| &self.types[t].kind) {
            Some(Kind::Object { members, .. }) => members.iter().map(|m| m.name.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// The values of an enum type (empty for other types).
    pub fn enum_values(&self, type_name: &str) -> Vec<&str> {
        match self.lookup(type_name).map(|t| &self.types[t].kind) {
            Some(Kind::Enum(values)) => values.iter().map(|v| v.name.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The nesting depth of a value (scalars 0), computed without recursion.
fn nesting_depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// Raw definitions are resolved in two passes: first every named type gets an
/// id, then bodies are resolved (bases flattened on demand).
#[derive(Default)]
struct Builder {
    types: Vec<TypeDef>,
    by_name: HashMap<String, TypeId>,
    arrays: HashMap<TypeId, TypeId>,
    /// Unresolved object bodies, by type id.
    pending: HashMap<TypeId, PendingObject>,
    resolving: Vec<TypeId>,
}

enum PendingObject {
    Struct {
        base: Option<String>,
        data: Map<String, Value>,
    },
    Union {
        base: Value,
        discriminator: String,
        data: Map<String, Value>,
    },
    Inline {
        data: Map<String, Value>,
    },
}

fn features_of(def: &Map<String, Value>, what: &str) -> Result<Vec<String>, String> {
    match def.get("features") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what}: features must be strings"))
            })
            .collect(),
        Some(_) => Err(format!("{what}: 'features' must be an array")),
    }
}

fn check_keys(def: &Map<String, Value>, what: &str, allowed: &[&str]) -> Result<(), String> {
    for k in def.keys() {
        if !allowed.contains(&k.as_str()) && k != "features" && k != "doc" {
            return Err(format!("{what}: unknown key '{k}'"));
        }
    }
    Ok(())
}

impl Builder {
    fn add_type(
        &mut self,
        name: &str,
        kind: Kind,
        features: Vec<String>,
    ) -> Result<TypeId, String> {
        if self.by_name.contains_key(name) {
            return Err(format!("schema: duplicate definition of '{name}'"));
        }
        let id = self.types.len();
        self.types.push(TypeDef {
            name: name.to_string(),
            kind,
            features,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    fn array_of(&mut self, elem: TypeId) -> TypeId {
        if let Some(&id) = self.arrays.get(&elem) {
            return id;
        }
        let id = self.types.len();
        let name = format!("{}List", self.types[elem].name);
        self.types.push(TypeDef {
            name: name.clone(),
            kind: Kind::Array(elem),
            features: Vec::new(),
        });
        self.by_name.entry(name).or_insert(id);
        self.arrays.insert(elem, id);
        id
    }

    /// A type reference: `"Name"` or `["Name"]`.
    fn type_ref(&mut self, v: &Value, what: &str) -> Result<TypeId, String> {
        match v {
            Value::String(name) => self
                .by_name
                .get(name)
                .copied()
                .ok_or_else(|| format!("{what}: unknown type '{name}'")),
            Value::Array(items) if items.len() == 1 => {
                let elem = self.type_ref(&items[0], what)?;
                if matches!(self.types[elem].kind, Kind::Array(_)) {
                    return Err(format!("{what}: arrays of arrays are not supported"));
                }
                Ok(self.array_of(elem))
            }
            _ => Err(format!("{what}: a type must be a name or [name]")),
        }
    }

    fn members(&mut self, data: &Map<String, Value>, what: &str) -> Result<Vec<Member>, String> {
        let mut out = Vec::new();
        for (key, spec) in data {
            let (name, optional) = match key.strip_prefix('*') {
                Some(n) => (n.to_string(), true),
                None => (key.clone(), false),
            };
            let mwhat = format!("{what}, member '{name}'");
            let (ty, features) = match spec {
                Value::Object(m) => {
                    check_keys(m, &mwhat, &["type"])?;
                    let ty = m
                        .get("type")
                        .ok_or_else(|| format!("{mwhat}: missing 'type'"))?;
                    (self.type_ref(ty, &mwhat)?, features_of(m, &mwhat)?)
                }
                other => (self.type_ref(other, &mwhat)?, Vec::new()),
            };
            if out.iter().any(|m: &Member| m.name == name) {
                return Err(format!("{mwhat}: duplicate member"));
            }
            out.push(Member {
                name,
                ty,
                optional,
                features,
            });
        }
        Ok(out)
    }

    /// Resolves an object type's body if still pending, and returns its
    /// flattened members.
    fn resolve_object(&mut self, id: TypeId) -> Result<Vec<Member>, String> {
        if self.resolving.contains(&id) {
            return Err(format!("schema: '{}' is its own base", self.types[id].name));
        }
        if let Some(pending) = self.pending.remove(&id) {
            self.resolving.push(id);
            let name = self.types[id].name.clone();
            let what = format!("'{name}'");
            let kind = match pending {
                PendingObject::Inline { data } => Kind::Object {
                    members: self.members(&data, &what)?,
                    variants: None,
                },
                PendingObject::Struct { base, data } => {
                    let mut members = match base {
                        Some(b) => self.base_members(&Value::String(b), &name)?,
                        None => Vec::new(),
                    };
                    let own = self.members(&data, &what)?;
                    self.merge(&mut members, own, &what)?;
                    Kind::Object {
                        members,
                        variants: None,
                    }
                }
                PendingObject::Union {
                    base,
                    discriminator,
                    data,
                } => {
                    let members = self.base_members(&base, &name)?;
                    let tag = members
                        .iter()
                        .find(|m| m.name == discriminator)
                        .ok_or_else(|| {
                            format!("{what}: discriminator '{discriminator}' is not a base member")
                        })?
                        .clone();
                    if tag.optional {
                        return Err(format!(
                            "{what}: discriminator '{discriminator}' must not be optional"
                        ));
                    }
                    let Kind::Enum(values) = &self.types[tag.ty].kind else {
                        return Err(format!(
                            "{what}: discriminator '{discriminator}' must be an enum"
                        ));
                    };
                    let values: Vec<String> = values.iter().map(|v| v.name.clone()).collect();
                    let mut cases = Vec::new();
                    for (case, branch) in &data {
                        if !values.contains(case) {
                            return Err(format!(
                                "{what}: branch '{case}' is not a value of the discriminator"
                            ));
                        }
                        let bwhat = format!("{what}, branch '{case}'");
                        let bty = self.type_ref(branch, &bwhat)?;
                        // Structs and unions still pending are objects too.
                        if !matches!(self.types[bty].kind, Kind::Object { .. }) {
                            return Err(format!("{bwhat}: branch types must be structs or unions"));
                        }
                        let bmembers = self.resolve_object(bty)?;
                        for m in &bmembers {
                            if members.iter().any(|b| b.name == m.name) {
                                return Err(format!(
                                    "{bwhat}: member '{}' clashes with the base",
                                    m.name
                                ));
                            }
                        }
                        cases.push((case.clone(), bty));
                    }
                    Kind::Object {
                        members,
                        variants: Some(Variants {
                            tag: discriminator,
                            cases,
                        }),
                    }
                }
            };
            self.types[id].kind = kind;
            self.resolving.pop();
        }
        match &self.types[id].kind {
            Kind::Object { members, .. } => Ok(members.clone()),
            _ => Err(format!(
                "schema: '{}' is not a struct or union",
                self.types[id].name
            )),
        }
    }

    fn base_members(&mut self, base: &Value, owner: &str) -> Result<Vec<Member>, String> {
        match base {
            Value::String(b) => {
                let bid = *self
                    .by_name
                    .get(b)
                    .ok_or_else(|| format!("'{owner}': unknown base '{b}'"))?;
                if let Kind::Object {
                    variants: Some(_), ..
                } = &self.types[bid].kind
                {
                    return Err(format!("'{owner}': a base must not be a union"));
                }
                if matches!(self.pending.get(&bid), Some(PendingObject::Union { .. })) {
                    return Err(format!("'{owner}': a base must not be a union"));
                }
                self.resolve_object(bid)
            }
            Value::Object(data) => {
                // An implicit base type, as QAPI names it.
                let name = format!("q_obj_{owner}-base");
                let id = self.add_type(
                    &name,
                    Kind::Object {
                        members: Vec::new(),
                        variants: None,
                    },
                    Vec::new(),
                )?;
                self.pending
                    .insert(id, PendingObject::Inline { data: data.clone() });
                self.resolve_object(id)
            }
            _ => Err(format!(
                "'{owner}': 'base' must be a type name or a member list"
            )),
        }
    }

    fn merge(&self, members: &mut Vec<Member>, own: Vec<Member>, what: &str) -> Result<(), String> {
        for m in own {
            if members.iter().any(|b| b.name == m.name) {
                return Err(format!("{what}: member '{}' clashes with the base", m.name));
            }
            members.push(m);
        }
        Ok(())
    }

    fn qtype_of_type(&self, id: TypeId) -> Option<QType> {
        match &self.types[id].kind {
            Kind::Builtin(Builtin::Str) | Kind::Enum(_) => Some(QType::String),
            Kind::Builtin(Builtin::Int(_) | Builtin::Size | Builtin::Number) => Some(QType::Number),
            Kind::Builtin(Builtin::Bool) => Some(QType::Bool),
            Kind::Builtin(Builtin::Null) => Some(QType::Null),
            Kind::Builtin(Builtin::Any) => None,
            Kind::Object { .. } => Some(QType::Dict),
            Kind::Array(_) => Some(QType::List),
            Kind::Alternate(_) => None,
        }
    }

    fn build(mut self, defs: Vec<Value>) -> Result<Schema, String> {
        for (name, b) in BUILTINS {
            self.add_type(name, Kind::Builtin(*b), Vec::new())?;
        }
        let empty = self.add_type(
            "q_empty",
            Kind::Object {
                members: Vec::new(),
                variants: None,
            },
            Vec::new(),
        )?;

        // Pass 1: name every type.
        let mut defs_maps = Vec::new();
        for (i, def) in defs.into_iter().enumerate() {
            let Value::Object(def) = def else {
                return Err(format!("schema: definition #{i} is not an object"));
            };
            let kind = ["enum", "struct", "union", "alternate", "command", "event"]
                .into_iter()
                .find(|k| def.contains_key(*k))
                .ok_or_else(|| {
                    format!(
                        "schema: definition #{i} has no enum/struct/union/alternate/command/event"
                    )
                })?;
            let name = def[kind]
                .as_str()
                .ok_or_else(|| format!("schema: definition #{i}: '{kind}' must be a string"))?
                .to_string();
            let what = format!("{kind} '{name}'");
            let features = features_of(&def, &what)?;
            match kind {
                "enum" => {
                    check_keys(&def, &what, &["enum", "data"])?;
                    let Some(Value::Array(items)) = def.get("data") else {
                        return Err(format!("{what}: 'data' must be an array"));
                    };
                    let mut values: Vec<EnumValue> = Vec::new();
                    for item in items {
                        let v = match item {
                            Value::String(s) => EnumValue {
                                name: s.clone(),
                                features: Vec::new(),
                            },
                            Value::Object(m) => {
                                check_keys(m, &what, &["name"])?;
                                let n = m
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| format!("{what}: value without name"))?;
                                EnumValue {
                                    name: n.to_string(),
                                    features: features_of(m, &what)?,
                                }
                            }
                            _ => return Err(format!("{what}: bad value {item}")),
                        };
                        if values.iter().any(|x| x.name == v.name) {
                            return Err(format!("{what}: duplicate value '{}'", v.name));
                        }
                        values.push(v);
                    }
                    self.add_type(&name, Kind::Enum(values), features)?;
                }
                "struct" | "union" | "alternate" => {
                    let kind_placeholder = if kind == "alternate" {
                        Kind::Alternate(Vec::new())
                    } else {
                        Kind::Object {
                            members: Vec::new(),
                            variants: None,
                        }
                    };
                    self.add_type(&name, kind_placeholder, features)?;
                }
                _ => {}
            }
            defs_maps.push((kind, name, def));
        }

        // Pass 2: bodies.
        let mut alternates = Vec::new();
        for (kind, name, def) in &defs_maps {
            let what = format!("{kind} '{name}'");
            match *kind {
                "struct" => {
                    check_keys(def, &what, &["struct", "data", "base"])?;
                    let data = match def.get("data") {
                        Some(Value::Object(m)) => m.clone(),
                        None => Map::new(),
                        Some(_) => return Err(format!("{what}: 'data' must be an object")),
                    };
                    let base = match def.get("base") {
                        None => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(_) => return Err(format!("{what}: 'base' must be a type name")),
                    };
                    let id = self.by_name[name];
                    self.pending
                        .insert(id, PendingObject::Struct { base, data });
                }
                "union" => {
                    check_keys(def, &what, &["union", "data", "base", "discriminator"])?;
                    let Some(Value::Object(data)) = def.get("data") else {
                        return Err(format!("{what}: 'data' must be an object"));
                    };
                    let base = def
                        .get("base")
                        .cloned()
                        .ok_or_else(|| format!("{what}: missing 'base'"))?;
                    let discriminator = def
                        .get("discriminator")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{what}: missing 'discriminator'"))?
                        .to_string();
                    let id = self.by_name[name];
                    self.pending.insert(
                        id,
                        PendingObject::Union {
                            base,
                            discriminator,
                            data: data.clone(),
                        },
                    );
                }
                "alternate" => {
                    check_keys(def, &what, &["alternate", "data"])?;
                    let Some(Value::Object(data)) = def.get("data") else {
                        return Err(format!("{what}: 'data' must be an object"));
                    };
                    alternates.push((self.by_name[name], data.clone(), what));
                }
                _ => {}
            }
        }
        let ids: Vec<TypeId> = self.pending.keys().copied().collect();
        for id in ids {
            if self.pending.contains_key(&id) {
                self.resolve_object(id)?;
            }
        }
        for (id, data, what) in alternates {
            let mut branches = Vec::new();
            let mut seen: Vec<QType> = Vec::new();
            for (bname, bty) in &data {
                let bwhat = format!("{what}, branch '{bname}'");
                let ty = self.type_ref(bty, &bwhat)?;
                let q = self
                    .qtype_of_type(ty)
                    .ok_or_else(|| format!("{bwhat}: type not allowed in an alternate"))?;
                if seen.contains(&q) {
                    return Err(format!("{bwhat}: ambiguous with an earlier branch"));
                }
                seen.push(q);
                branches.push((bname.clone(), ty));
            }
            if branches.is_empty() {
                return Err(format!("{what}: no branches"));
            }
            self.types[id].kind = Kind::Alternate(branches);
        }

        // Pass 3: commands and events.
        let mut entities = Vec::new();
        let mut commands = HashMap::new();
        let mut events = HashMap::new();
        for (kind, name, def) in &defs_maps {
            let what = format!("{kind} '{name}'");
            let features = features_of(def, &what)?;
            let boxed = match def.get("boxed") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(format!("{what}: 'boxed' must be a boolean")),
            };
            let arg = |this: &mut Builder| -> Result<Option<TypeId>, String> {
                match def.get("data") {
                    None => Ok(None),
                    Some(Value::String(t)) => {
                        let id = this.type_ref(&Value::String(t.clone()), &what)?;
                        if !matches!(this.types[id].kind, Kind::Object { .. }) {
                            return Err(format!("{what}: 'data' must be a struct or union"));
                        }
                        Ok(Some(id))
                    }
                    Some(Value::Object(m)) => {
                        if boxed {
                            return Err(format!("{what}: \"boxed\" needs a type name as 'data'"));
                        }
                        let tname = format!("q_obj_{name}-arg");
                        let id = this.add_type(
                            &tname,
                            Kind::Object {
                                members: Vec::new(),
                                variants: None,
                            },
                            Vec::new(),
                        )?;
                        this.pending
                            .insert(id, PendingObject::Inline { data: m.clone() });
                        this.resolve_object(id)?;
                        Ok(Some(id))
                    }
                    Some(_) => Err(format!("{what}: bad 'data'")),
                }
            };
            match *kind {
                "command" => {
                    check_keys(
                        def,
                        &what,
                        &["command", "data", "boxed", "returns", "allow-oob"],
                    )?;
                    let arg = arg(&mut self)?;
                    let ret = match def.get("returns") {
                        None => None,
                        Some(r) => Some(self.type_ref(r, &what)?),
                    };
                    let allow_oob = def
                        .get("allow-oob")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    if commands.insert(name.clone(), entities.len()).is_some() {
                        return Err(format!("{what}: duplicate command"));
                    }
                    entities.push(Entity {
                        name: name.clone(),
                        kind: EntityKind::Command {
                            arg,
                            ret,
                            allow_oob,
                        },
                        features,
                    });
                }
                "event" => {
                    check_keys(def, &what, &["event", "data", "boxed"])?;
                    let arg = arg(&mut self)?;
                    if events.insert(name.clone(), entities.len()).is_some() {
                        return Err(format!("{what}: duplicate event"));
                    }
                    entities.push(Entity {
                        name: name.clone(),
                        kind: EntityKind::Event { arg },
                        features,
                    });
                }
                _ => {}
            }
        }

        let introspection = Introspector::new(&mut self, empty).run(&entities);
        Ok(Schema {
            types: self.types,
            by_name: self.by_name,
            entities,
            commands,
            events,
            empty,
            introspection,
        })
    }
}

/// A port of QEMU's `scripts/qapi/introspect.py`.
struct Introspector<'b> {
    b: &'b mut Builder,
    empty: TypeId,
    int: TypeId,
    trees: Vec<Value>,
    used: Vec<TypeId>,
    names: HashMap<String, String>,
}

impl<'b> Introspector<'b> {
    fn new(b: &'b mut Builder, empty: TypeId) -> Self {
        let int = b.by_name["int"];
        Introspector {
            b,
            empty,
            int,
            trees: Vec::new(),
            used: Vec::new(),
            names: HashMap::new(),
        }
    }

    fn json_type_is_int(&self, id: TypeId) -> bool {
        matches!(
            self.b.types[id].kind,
            Kind::Builtin(Builtin::Int(_) | Builtin::Size)
        )
    }

    fn mask(&mut self, name: &str) -> String {
        let n = self.names.len();
        self.names
            .entry(name.to_string())
            .or_insert_with(|| n.to_string())
            .clone()
    }

    fn use_type(&mut self, mut id: TypeId) -> String {
        if self.json_type_is_int(id) {
            id = self.int;
        } else if let Kind::Array(elem) = self.b.types[id].kind {
            if self.json_type_is_int(elem) {
                id = self.b.array_of(self.int);
            }
        }
        if !self.used.contains(&id) {
            self.used.push(id);
        }
        match self.b.types[id].kind {
            Kind::Builtin(_) => self.b.types[id].name.clone(),
            Kind::Array(elem) => format!("[{}]", self.use_type(elem)),
            _ => {
                let name = self.b.types[id].name.clone();
                self.mask(&name)
            }
        }
    }

    /// Entries are built with sorted keys, like QEMU's generated QLit.
    fn tree(&mut self, name: String, meta: &str, mut obj: Map<String, Value>, features: &[String]) {
        obj.insert("name".into(), Value::String(name));
        obj.insert("meta-type".into(), Value::String(meta.into()));
        if !features.is_empty() {
            obj.insert("features".into(), json!(features));
        }
        let mut sorted: Vec<(String, Value)> = obj.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        self.trees.push(Value::Object(sorted.into_iter().collect()));
    }

    fn run(mut self, entities: &[Entity]) -> Value {
        for e in entities {
            let mut obj = Map::new();
            match &e.kind {
                EntityKind::Command {
                    arg,
                    ret,
                    allow_oob,
                } => {
                    let a = self.use_type(arg.unwrap_or(self.empty));
                    let r = self.use_type(ret.unwrap_or(self.empty));
                    obj.insert("arg-type".into(), Value::String(a));
                    obj.insert("ret-type".into(), Value::String(r));
                    if *allow_oob {
                        obj.insert("allow-oob".into(), Value::Bool(true));
                    }
                    self.tree(e.name.clone(), "command", obj, &e.features);
                }
                EntityKind::Event { arg } => {
                    let a = self.use_type(arg.unwrap_or(self.empty));
                    obj.insert("arg-type".into(), Value::String(a));
                    self.tree(e.name.clone(), "event", obj, &e.features);
                }
            }
        }
        let mut i = 0;
        while i < self.used.len() {
            let id = self.used[i];
            self.visit_type(id);
            i += 1;
        }
        Value::Array(self.trees)
    }

    fn member(&mut self, m: &Member) -> Value {
        let mut obj = Map::new();
        obj.insert("name".into(), Value::String(m.name.clone()));
        let t = self.use_type(m.ty);
        obj.insert("type".into(), Value::String(t));
        if m.optional {
            obj.insert("default".into(), Value::Null);
        }
        if !m.features.is_empty() {
            obj.insert("features".into(), json!(m.features));
        }
        sorted_object(obj)
    }

    fn visit_type(&mut self, id: TypeId) {
        let def = self.b.types[id].clone();
        match &def.kind {
            Kind::Builtin(b) => {
                let obj = Map::from_iter([("json-type".to_string(), json!(b.json_type()))]);
                self.tree(def.name.clone(), "builtin", obj, &[]);
            }
            Kind::Enum(values) => {
                let members: Vec<Value> = values
                    .iter()
                    .map(|v| {
                        let mut m = Map::new();
                        m.insert("name".into(), json!(v.name));
                        if !v.features.is_empty() {
                            m.insert("features".into(), json!(v.features));
                        }
                        sorted_object(m)
                    })
                    .collect();
                let vals: Vec<Value> = values.iter().map(|v| json!(v.name)).collect();
                let obj = Map::from_iter([
                    ("members".to_string(), Value::Array(members)),
                    ("values".to_string(), Value::Array(vals)),
                ]);
                let name = self.mask(&def.name);
                self.tree(name, "enum", obj, &def.features);
            }
            Kind::Array(elem) => {
                let e = self.use_type(*elem);
                let obj = Map::from_iter([("element-type".to_string(), json!(e))]);
                self.tree(format!("[{e}]"), "array", obj, &[]);
            }
            Kind::Object { members, variants } => {
                let ms: Vec<Value> = members.iter().map(|m| self.member(m)).collect();
                let mut obj = Map::new();
                obj.insert("members".into(), Value::Array(ms));
                if let Some(v) = variants {
                    obj.insert("tag".into(), json!(v.tag));
                    let cases: Vec<Value> = v
                        .cases
                        .iter()
                        .map(|(case, ty)| {
                            let t = self.use_type(*ty);
                            sorted_object(Map::from_iter([
                                ("case".to_string(), json!(case)),
                                ("type".to_string(), json!(t)),
                            ]))
                        })
                        .collect();
                    obj.insert("variants".into(), Value::Array(cases));
                }
                let name = self.mask(&def.name);
                self.tree(name, "object", obj, &def.features);
            }
            Kind::Alternate(branches) => {
                let ms: Vec<Value> = branches
                    .iter()
                    .map(|(_, ty)| {
                        let t = self.use_type(*ty);
                        json!({ "type": t })
                    })
                    .collect();
                let obj = Map::from_iter([("members".to_string(), Value::Array(ms))]);
                let name = self.mask(&def.name);
                self.tree(name, "alternate", obj, &def.features);
            }
        }
    }
}

fn sorted_object(obj: Map<String, Value>) -> Value {
    let mut sorted: Vec<(String, Value)> = obj.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(sorted.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
# A comment line.
[
  {"enum": "Mode", "data": ["safe", {"name": "hard", "features": ["unstable"]}]},
  {"struct": "Base", "data": {"id": "str", "*n": "uint16"}},
  {"struct": "Thing", "base": "Base", "data": {"*list": ["int8"], "*flag": {"type": "bool", "features": ["deprecated"]}}},
  {"alternate": "Ref", "data": {"definition": "Thing", "reference": "str"}},
  {"union": "U", "base": {"kind": "Mode", "*common": "size"}, "discriminator": "kind",
   "data": {"safe": "Thing"}},
  {"command": "do-thing", "data": {"ref": "Ref", "*mode": "Mode"}, "returns": ["Thing"]},
  {"command": "do-union", "data": "U", "boxed": true, "features": ["deprecated"]},
  {"command": "ping", "allow-oob": true},
  {"event": "THING_HAPPENED", "data": {"id": "str"}},
  {"event": "BARE"}
]"#;

    #[test]
    fn introspection_matches_qemu_format() {
        let s = Schema::from_source(SMALL).unwrap();
        let expected = json!([
            {"arg-type": "0", "meta-type": "command", "name": "do-thing", "ret-type": "[1]"},
            {"arg-type": "2", "features": ["deprecated"], "meta-type": "command", "name": "do-union", "ret-type": "3"},
            {"allow-oob": true, "arg-type": "3", "meta-type": "command", "name": "ping", "ret-type": "3"},
            {"arg-type": "4", "meta-type": "event", "name": "THING_HAPPENED"},
            {"arg-type": "3", "meta-type": "event", "name": "BARE"},
            {"members": [{"name": "ref", "type": "5"}, {"default": null, "name": "mode", "type": "6"}],
             "meta-type": "object", "name": "0"},
            {"element-type": "1", "meta-type": "array", "name": "[1]"},
            {"members": [{"name": "id", "type": "str"}, {"default": null, "name": "n", "type": "int"},
                         {"default": null, "name": "list", "type": "[int]"},
                         {"default": null, "features": ["deprecated"], "name": "flag", "type": "bool"}],
             "meta-type": "object", "name": "1"},
            {"members": [{"name": "kind", "type": "6"}, {"default": null, "name": "common", "type": "int"}],
             "meta-type": "object", "name": "2", "tag": "kind", "variants": [{"case": "safe", "type": "1"}]},
            {"members": [], "meta-type": "object", "name": "3"},
            {"members": [{"name": "id", "type": "str"}], "meta-type": "object", "name": "4"},
            {"members": [{"type": "1"}, {"type": "str"}], "meta-type": "alternate", "name": "5"},
            {"members": [{"name": "safe"}, {"features": ["unstable"], "name": "hard"}],
             "meta-type": "enum", "name": "6", "values": ["safe", "hard"]},
            {"json-type": "string", "meta-type": "builtin", "name": "str"},
            {"json-type": "int", "meta-type": "builtin", "name": "int"},
            {"element-type": "int", "meta-type": "array", "name": "[int]"},
            {"json-type": "boolean", "meta-type": "builtin", "name": "bool"},
        ]);
        assert_eq!(s.introspect(), expected);
    }

    #[test]
    fn command_lists() {
        let s = Schema::from_source(SMALL).unwrap();
        assert_eq!(s.command_names(), ["ping", "do-union", "do-thing"]);
        assert_eq!(
            s.query_commands(),
            json!([{"name": "ping"}, {"name": "do-union"}, {"name": "do-thing"}])
        );
        assert!(s.has_command("ping") && !s.has_command("THING_HAPPENED"));
        assert!(s.has_event("BARE"));
        assert!(s.command_allows_oob("ping") && !s.command_allows_oob("do-thing"));
        assert_eq!(s.member_names("Thing"), ["id", "n", "list", "flag"]);
        assert_eq!(s.enum_values("Mode"), ["safe", "hard"]);
    }

    #[test]
    fn source_errors() {
        let err = |src: &str| Schema::from_source(src).unwrap_err();
        assert!(err("{}").contains("array"));
        assert!(err(r#"[{"struct": "A", "data": {"x": "Nope"}}]"#).contains("unknown type 'Nope'"));
        assert!(err(r#"[{"struct": "A"}, {"enum": "A", "data": []}]"#)
            .contains("duplicate definition of 'A'"));
        assert!(err(r#"[{"struct": "A", "base": "A"}]"#).contains("its own base"));
        assert!(err(r#"[{"struct": "A", "data": {}, "bogus": 1}]"#).contains("unknown key 'bogus'"));
        assert!(err(r#"[{"enum": "E", "data": ["a"]}, {"union": "U", "base": {"k": "str"}, "discriminator": "k", "data": {}}]"#)
            .contains("must be an enum"));
        assert!(err(r#"[{"enum": "E", "data": ["a"]}, {"struct": "S"}, {"union": "U", "base": {"k": "E"}, "discriminator": "k", "data": {"b": "S"}}]"#)
            .contains("branch 'b' is not a value"));
        assert!(err(r#"[{"struct": "S", "data": {"k": "str"}}, {"enum": "E", "data": ["a"]}, {"union": "U", "base": {"k": "E"}, "discriminator": "k", "data": {"a": "S"}}]"#)
            .contains("clashes with the base"));
        assert!(
            err(r#"[{"alternate": "A", "data": {"a": "str", "b": "str"}}]"#).contains("ambiguous")
        );
        assert!(err(r#"[{"command": "c"}, {"command": "c"}]"#).contains("duplicate command"));
        assert!(
            err(r#"[{"struct": "S", "data": {"a": "int", "a": "str"}}]"#).contains("duplicate")
        );
    }
}
