//! Statements with their arguments, and the rows they return, the same on both engines.
//!
//! `query("… WHERE id = $1").bind(id).fetch_one(&store)` (or `&mut tx`): the text uses `$N`
//! placeholders on both engines; arguments are [`Value`]s; a [`Row`] holds its columns' values
//! by name.

use std::sync::Arc;

use crate::error::StoreError;

/// A statement's argument or a column's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL, with the type PostgreSQL should give it.
    Null(Kind),
    /// A 64-bit integer (also booleans, as 0 and 1, on SQLite).
    Int(i64),
    /// A boolean (PostgreSQL's `BOOLEAN`).
    Bool(bool),
    /// A double.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// The type of a [`Value`], for typed NULLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `BIGINT`.
    Int,
    /// `BOOLEAN`.
    Bool,
    /// `DOUBLE PRECISION`.
    Real,
    /// `TEXT`.
    Text,
    /// `BYTEA` / `BLOB`.
    Blob,
}

/// What can be bound as an argument.
pub trait Encode {
    /// The type of its NULL.
    const KIND: Kind;
    /// The value to bind.
    fn encode(self) -> Value;
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            const KIND: Kind = Kind::Int;
            fn encode(self) -> Value {
                Value::Int(self as i64)
            }
        }
    )*};
}
encode_int!(i64, i32, i16, u32, u16, u8);

impl Encode for bool {
    const KIND: Kind = Kind::Bool;
    fn encode(self) -> Value {
        Value::Bool(self)
    }
}

impl Encode for f64 {
    const KIND: Kind = Kind::Real;
    fn encode(self) -> Value {
        Value::Real(self)
    }
}

impl Encode for String {
    const KIND: Kind = Kind::Text;
    fn encode(self) -> Value {
        Value::Text(self)
    }
}

impl Encode for &str {
    const KIND: Kind = Kind::Text;
    fn encode(self) -> Value {
        Value::Text(self.to_string())
    }
}

impl<T: Encode + Clone> Encode for &T {
    const KIND: Kind = T::KIND;
    fn encode(self) -> Value {
        self.clone().encode()
    }
}

impl Encode for Vec<u8> {
    const KIND: Kind = Kind::Blob;
    fn encode(self) -> Value {
        Value::Blob(self)
    }
}

impl Encode for &[u8] {
    const KIND: Kind = Kind::Blob;
    fn encode(self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl<T: Encode> Encode for Option<T> {
    const KIND: Kind = T::KIND;
    fn encode(self) -> Value {
        match self {
            Some(v) => v.encode(),
            None => Value::Null(T::KIND),
        }
    }
}

/// What a column's value can be read as.
pub trait Decode: Sized {
    /// Reads `value`; `Err` says what it was instead.
    fn decode(value: &Value) -> Result<Self, String>;
}

fn mismatch(want: &str, got: &Value) -> String {
    format!("expected {want}, found {got:?}")
}

impl Decode for i64 {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Int(n) => Ok(*n),
            Value::Bool(b) => Ok(i64::from(*b)),
            other => Err(mismatch("an integer", other)),
        }
    }
}

impl Decode for i32 {
    fn decode(value: &Value) -> Result<Self, String> {
        let n = i64::decode(value)?;
        i32::try_from(n).map_err(|_| format!("{n} does not fit in 32 bits"))
    }
}

impl Decode for bool {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Bool(b) => Ok(*b),
            Value::Int(n) => Ok(*n != 0),
            other => Err(mismatch("a boolean", other)),
        }
    }
}

impl Decode for f64 {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Real(x) => Ok(*x),
            Value::Int(n) => Ok(*n as f64),
            other => Err(mismatch("a number", other)),
        }
    }
}

impl Decode for String {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            other => Err(mismatch("text", other)),
        }
    }
}

impl Decode for Vec<u8> {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.clone().into_bytes()),
            other => Err(mismatch("bytes", other)),
        }
    }
}

impl<T: Decode> Decode for Option<T> {
    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null(_) => Ok(None),
            other => T::decode(other).map(Some),
        }
    }
}

/// A column named or numbered (from 0).
pub trait ColumnIndex {
    /// Its position in `columns`.
    fn position(&self, columns: &[String]) -> Option<usize>;
}

impl ColumnIndex for &str {
    fn position(&self, columns: &[String]) -> Option<usize> {
        columns.iter().position(|c| c == self)
    }
}

impl ColumnIndex for usize {
    fn position(&self, columns: &[String]) -> Option<usize> {
        (*self < columns.len()).then_some(*self)
    }
}

/// One row a statement returned.
#[derive(Debug, Clone)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    pub(super) fn new(columns: Arc<[String]>, values: Vec<Value>) -> Row {
        Row { columns, values }
    }

    /// The value of column `index` (a name or a position) as `T`.
    pub fn try_get<T: Decode, I: ColumnIndex + std::fmt::Debug>(&self, index: I) -> Result<T, StoreError> {
        let at = index
            .position(&self.columns)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {index:?} in {:?}", self.columns)))?;
        T::decode(&self.values[at]).map_err(|e| StoreError::Corrupt(format!("column {index:?}: {e}")))
    }
}

/// What an `execute` changed.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    rows: u64,
}

impl Done {
    pub(super) fn new(rows: u64) -> Done {
        Done { rows }
    }

    /// How many rows the statement inserted, updated or deleted.
    pub fn rows_affected(&self) -> u64 {
        self.rows
    }
}

/// A statement and its arguments; run it with `execute` or one of the `fetch` methods on a
/// `&Store` (a statement of its own) or a `&mut Tx`.
#[derive(Debug, Clone)]
#[must_use = "a query does nothing until it is executed or fetched"]
pub struct Query<'q> {
    pub(super) sql: &'q str,
    pub(super) args: Vec<Value>,
}

/// A statement with `$1`, `$2`, … placeholders.
pub fn query(sql: &str) -> Query<'_> {
    Query { sql, args: Vec::new() }
}

impl<'q> Query<'q> {
    /// Binds the next placeholder.
    pub fn bind<T: Encode>(mut self, value: T) -> Self {
        self.args.push(value.encode());
        self
    }

    /// Runs it; how many rows it changed.
    pub async fn execute<'c>(self, on: impl Into<super::Target<'c>>) -> Result<Done, StoreError> {
        on.into().execute(self).await
    }

    /// Every row it returns.
    pub async fn fetch_all<'c>(self, on: impl Into<super::Target<'c>>) -> Result<Vec<Row>, StoreError> {
        on.into().fetch(self).await
    }

    /// Its first row, if any.
    pub async fn fetch_optional<'c>(self, on: impl Into<super::Target<'c>>) -> Result<Option<Row>, StoreError> {
        Ok(self.fetch_all(on).await?.into_iter().next())
    }

    /// Its first row; [`StoreError::NoRow`] when it returns none.
    pub async fn fetch_one<'c>(self, on: impl Into<super::Target<'c>>) -> Result<Row, StoreError> {
        let sql = self.sql;
        self.fetch_optional(on)
            .await?
            .ok_or_else(|| StoreError::NoRow(sql.to_string()))
    }

    /// The first column of every row as `T`.
    pub async fn fetch_column<'c, T: Decode>(self, on: impl Into<super::Target<'c>>) -> Result<Vec<T>, StoreError> {
        self.fetch_all(on).await?.iter().map(|row| row.try_get(0)).collect()
    }

    /// The first column of its first row as `T`.
    pub async fn fetch_scalar<'c, T: Decode>(self, on: impl Into<super::Target<'c>>) -> Result<T, StoreError> {
        self.fetch_one(on).await?.try_get(0)
    }
}

/// `count` numbered placeholders from `$first` on, for a statement built at run time:
/// `$2, $3, $4`.
pub fn params(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
