//! A write statement that binds its text parameters without copying them.
//!
//! rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite frees the parameter's previous
//! buffer, allocates a new one and copies the text in, parameter by parameter. A backfill binds
//! 10 to 17 texts a record, and that was 7 % of its instructions. Bound as `SQLITE_STATIC`,
//! SQLite reads the caller's text in place. That is only sound while the text lives, so this
//! type never lets a binding outlive one call: `execute` binds every parameter, runs the
//! statement and clears the bindings before it returns, and its slice of values borrows them
//! for exactly that long. This is the only `unsafe` in the crate; it is kept to that.

use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use rusqlite::{Connection, ffi};

/// A prepared statement of `conn` whose every execution binds borrowed texts (or NULLs).
pub struct BorrowingStatement<'c> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    parameters: usize,
    /// Borrows the connection: the statement is finalized (on drop) before it can close.
    _conn: PhantomData<&'c Connection>,
}

impl<'c> BorrowingStatement<'c> {
    /// Prepares one SQL statement (no trailing statements).
    pub fn prepare(conn: &'c Connection, sql: &str) -> rusqlite::Result<BorrowingStatement<'c>> {
        let length = c_int::try_from(sql.len()).map_err(|_| misuse("statement too long"))?;
        // SAFETY: the handle is the open connection `conn` borrows for `'c`; SQLite reads
        // `length` bytes of `sql` and writes the statement pointer, nothing else.
        let (db, rc, stmt) = unsafe {
            let db = conn.handle();
            let mut stmt = ptr::null_mut();
            let rc = ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                length,
                ffi::SQLITE_PREPARE_PERSISTENT as _,
                &mut stmt,
                ptr::null_mut(),
            );
            (db, rc, stmt)
        };
        check(db, rc)?;
        let stmt = NonNull::new(stmt).ok_or_else(|| misuse("no statement in the SQL"))?;
        // SAFETY: `stmt` is the statement just prepared.
        let parameters = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) };
        Ok(BorrowingStatement {
            stmt,
            db,
            parameters: usize::try_from(parameters).unwrap_or(0),
            _conn: PhantomData,
        })
    }

    /// Runs the statement once with `values` as its parameters, in order (`None` is NULL).
    /// There must be exactly as many values as the statement has parameters.
    pub fn execute(&mut self, values: &[Option<&str>]) -> rusqlite::Result<()> {
        if values.len() != self.parameters {
            return Err(misuse("wrong number of parameters"));
        }
        let stmt = self.stmt.as_ptr();
        let mut rc = ffi::SQLITE_OK;
        for (at, value) in (1..).zip(values) {
            // A NULL needs no binding: every parameter is NULL until bound, and again once the
            // bindings are cleared (below, at the end of every run).
            let Some(text) = value else { continue };
            // SAFETY: `stmt` is live and `at` is in range. A text is bound `SQLITE_STATIC`:
            // SQLite reads it in place until the bindings are cleared below, within this
            // call, while `values` borrows it.
            rc = unsafe {
                ffi::sqlite3_bind_text64(
                    stmt,
                    at,
                    text.as_ptr().cast(),
                    text.len() as ffi::sqlite3_uint64,
                    ffi::SQLITE_STATIC(),
                    ffi::SQLITE_UTF8 as _,
                )
            };
            if rc != ffi::SQLITE_OK {
                break;
            }
        }
        if rc == ffi::SQLITE_OK {
            // SAFETY: every parameter is bound to text that lives through this call.
            rc = match unsafe { ffi::sqlite3_step(stmt) } {
                ffi::SQLITE_DONE => ffi::SQLITE_OK,
                ffi::SQLITE_ROW => ffi::SQLITE_MISUSE,
                failed => failed,
            };
        }
        // SAFETY: `stmt` is live. After these no binding points at `values`: reset ends the
        // run (its result repeats the step's error, already in `rc`), clear unbinds.
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        check(self.db, rc)
    }
}

impl Drop for BorrowingStatement<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once, before its connection closes
        // (`'c`).
        unsafe {
            ffi::sqlite3_finalize(self.stmt.as_ptr());
        }
    }
}

/// `rc` as rusqlite's error, with the connection's message for it.
fn check(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Result<()> {
    if rc == ffi::SQLITE_OK {
        return Ok(());
    }
    // SAFETY: `db` is a live connection; its message is a NUL-terminated string SQLite owns,
    // copied out at once.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(db);
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message))
}

fn misuse(what: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_MISUSE), Some(what.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_written_as_bound_and_every_error_is_reported() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a TEXT PRIMARY KEY, b TEXT, c TEXT NOT NULL)")
            .unwrap();
        let mut insert =
            BorrowingStatement::prepare(&conn, "INSERT INTO t (a, b, c) VALUES (?1, ?2, ?3)")
                .unwrap();
        for i in 0..100 {
            // Texts that die right after the call: nothing of them may be read later.
            let a = format!("key {i}");
            let c = "é".repeat(i);
            insert.execute(&[Some(&a), None, Some(&c)]).unwrap();
        }
        insert.execute(&[Some(""), Some("b"), Some("")]).unwrap();
        let (n, sum): (i64, i64) = conn
            .query_row(
                "SELECT count(*), sum(length(c)) FROM t WHERE b IS NULL",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((n, sum), (100, (0..100).sum::<i64>()));
        let c: String = conn
            .query_row("SELECT c FROM t WHERE a = 'key 99'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(c, "é".repeat(99));

        // A constraint failure is the statement's error, and the statement stays usable.
        let duplicate = insert
            .execute(&[Some("key 1"), None, Some("x")])
            .unwrap_err();
        assert!(duplicate.to_string().contains("UNIQUE"), "{duplicate}");
        let null = insert.execute(&[Some("key x"), None, None]).unwrap_err();
        assert!(null.to_string().contains("NOT NULL"), "{null}");
        assert!(insert.execute(&[Some("one")]).is_err());
        insert.execute(&[Some("key y"), None, Some("y")]).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 102);
        // A NULL is not bound but left as the last run cleared it: never a text from before.
        insert
            .execute(&[Some("key z"), Some("b"), Some("z")])
            .unwrap();
        insert.execute(&[Some("key w"), None, Some("w")]).unwrap();
        let b: Option<String> = conn
            .query_row("SELECT b FROM t WHERE a = 'key w'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(b, None);

        assert!(BorrowingStatement::prepare(&conn, "INSERT INTO nowhere VALUES (1)").is_err());
    }
}
