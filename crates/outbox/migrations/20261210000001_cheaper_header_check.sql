-- Writers pay less for the header rule (issue 20, goal 5; docs/benchmarks.md, "Writers and the
-- archive"). The rule itself is unchanged: `headers` is an object whose values are strings of at
-- most 1024 characters without control characters, with non-empty keys without control
-- characters (CHECK outbox_event_headers_are_strings_without_control_chars, docs/outbox-table.md).
--
-- Why: the CHECK called a LANGUAGE sql function whose body has a subquery. Such a function is
-- never inlined, and PostgreSQL (15) parses, analyses and plans its body again for every statement
-- that evaluates the constraint: a writer sending single-row INSERTs paid that once per INSERT
-- (about half of what the table contract added to them), a multi-row INSERT once plus an executor
-- start per row. A PL/pgSQL function keeps its plans for the session, and the common case below
-- uses no query at all.

-- The rule as it was written, kept as the reference: headers longer than 1024 characters as text
-- are checked by it, and the tests compare the fast path with it.
CREATE FUNCTION outbox_headers_valid_full(h JSONB) RETURNS BOOLEAN
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN jsonb_typeof(h) IS DISTINCT FROM 'object' THEN false
               ELSE NOT EXISTS (
                   SELECT 1 FROM jsonb_each(h) AS kv(k, v)
                   WHERE jsonb_typeof(kv.v) <> 'string'
                      OR (kv.v #>> '{}') ~ '[[:cntrl:]]'
                      OR length(kv.v #>> '{}') > 1024
                      OR kv.k ~ '[[:cntrl:]]' OR kv.k = '')
          END $$;

-- Same signature and OID: the CHECK constraint that calls it keeps its name and its error.
-- The fast path reads the object's JSON text once:
--   * no value is longer than the whole text, so a text of at most 1024 characters needs no
--     per-value length check;
--   * jsonb's text output writes every character below U+0020 as an escape (\b \f \n \r \t or
--     \u00XX; \u is used for nothing else) and every other character as itself, so once the
--     escaped backslashes (\\, removed left to right as the output was written) are gone, a
--     control character in a key or value shows as itself ([[:cntrl:]]: DEL, C1...) or as one of
--     those escapes;
--   * an empty key is `h ? ''`, a value that is not a string a jsonpath filter.
CREATE OR REPLACE FUNCTION outbox_headers_valid(h JSONB) RETURNS BOOLEAN
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    t TEXT;
BEGIN
    IF jsonb_typeof(h) IS DISTINCT FROM 'object' THEN
        RETURN false;
    END IF;
    t := h::text;
    IF length(t) > 1024 THEN
        RETURN outbox_headers_valid_full(h);
    END IF;
    RETURN NOT h ? ''
       AND NOT jsonb_path_exists(h, 'strict $.* ? (@.type() != "string")')
       AND replace(t, '\\', '') !~ '[[:cntrl:]]|\\[bfnrtu]';
END $$;
