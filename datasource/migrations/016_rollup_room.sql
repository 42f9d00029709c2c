-- Half of each rollup page kept free; score-bin pages filled (issue 11, ingest).
--
-- A batch of labels adds its deltas to the rollup rows of its predictions' minutes (~25,000
-- minute rows for 50,000 labels at 1M predictions): most rows of a page, in one transaction,
-- whose old versions cannot be pruned before it commits. At 30 % free (009) only half of those
-- updates found room on the page (a HOT update); the others moved the row to another page and
-- inserted it into the primary key. At 50 % free: 92 % HOT in the minute rollup, the table no
-- larger after the run (116 -> 119 MB: fewer rows moved away), and PostgreSQL's CPU time for
-- 800K labels 10-19 % lower in three alternated runs (benchmarks/README.md, "Ingest: the
-- server's WAL settings").
-- The score-bin levels are only appended to and folded (DELETE, INSERT; since 011): no row is
-- updated, so the 30 % that 009 kept free there stayed empty.
-- Existing tables keep their filled pages; the settings apply to the pages filled next.
ALTER TABLE rollup SET (fillfactor = 50);
ALTER TABLE rollup_5m SET (fillfactor = 50);
ALTER TABLE rollup_1h SET (fillfactor = 50);
ALTER TABLE rollup_1d SET (fillfactor = 50);
ALTER TABLE score_bins_5m SET (fillfactor = 100);
ALTER TABLE score_bins_1h SET (fillfactor = 100);
ALTER TABLE score_bins_1d SET (fillfactor = 100);
