--- Golden plans of the query router (tests/unit/test_query_route.py::test_golden_plans).
--- Layout: hash, 4 shards, key customer_id (integer), reference table regions; dialect postgres.
--- Each statement is followed by its plan: shards, the SQL each shard runs, the merge.
--- Regenerate: A67_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_query_route.py -k golden

SELECT * FROM orders WHERE customer_id = 7;
-- shards: [3] (SELECT: pruned on the sharding key)
-- on [3]: SELECT * FROM orders WHERE customer_id = 7
-- merge: None

SELECT * FROM orders WHERE customer_id IN (1, 2, 3) ORDER BY id;
-- shards: [0, 2, 3] (SELECT: pruned on the sharding key)
-- on [0, 2, 3]: SELECT *, id AS _a67_o0 FROM orders WHERE customer_id IN (1, 2, 3) ORDER BY id
-- merge: RowsMerge(order=(SortKey(index=-1, descending=False, nulls_first=False),), distinct=False, offset=0, limit=None, hidden=1)

SELECT id, amount FROM orders ORDER BY amount DESC NULLS LAST, id LIMIT 10 OFFSET 5;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT id, amount FROM orders ORDER BY amount DESC NULLS LAST, id LIMIT 15
-- merge: RowsMerge(order=(SortKey(index=1, descending=True, nulls_first=False), SortKey(index=0, descending=False, nulls_first=False)), distinct=False, offset=5, limit=10, hidden=0)

SELECT id FROM orders ORDER BY created_at LIMIT 3;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT id, created_at AS _a67_o0 FROM orders ORDER BY created_at LIMIT 3
-- merge: RowsMerge(order=(SortKey(index=-1, descending=False, nulls_first=False),), distinct=False, offset=0, limit=3, hidden=1)

SELECT DISTINCT status FROM orders ORDER BY status LIMIT 2;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT DISTINCT status FROM orders ORDER BY status LIMIT 2
-- merge: RowsMerge(order=(SortKey(index=0, descending=False, nulls_first=False),), distinct=True, offset=0, limit=2, hidden=0)

SELECT COUNT(*), SUM(amount), AVG(amount), MIN(status), MAX(status) FROM orders;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT COUNT(*) AS _a67_p0, SUM(amount) AS _a67_p1, COUNT(amount) AS _a67_p2, MIN(status) AS _a67_p3, MAX(status) AS _a67_p4 FROM orders
-- merge: GroupedMerge(group_columns=(), carried_columns=(), aggregates=(Aggregate(function='count', columns=(0,), separator=''), Aggregate(function='sum', columns=(1,), separator=''), Aggregate(function='avg', columns=(1, 2), separator=''), Aggregate(function='min', columns=(3,), separator=''), Aggregate(function='max', columns=(4,), separator='')), outputs=(OutputColumn(name='count', expr=AggRef(index=0), type_column=None, type_name='bigint'), OutputColumn(name='sum', expr=AggRef(index=1), type_column=1, type_name=None), OutputColumn(name='avg', expr=AggRef(index=2), type_column=None, type_name=None), OutputColumn(name='min', expr=AggRef(index=3), type_column=3, type_name=None), OutputColumn(name='max', expr=AggRef(index=4), type_column=4, type_name=None)), having=None, order=(), distinct=False, offset=0, limit=None, scalar=True, rows_column=None)

SELECT status, COUNT(DISTINCT customer_id) AS buyers FROM orders GROUP BY status;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT status AS _a67_g0, customer_id AS _a67_d1 FROM orders GROUP BY status, customer_id
-- merge: GroupedMerge(group_columns=(0,), carried_columns=(0,), aggregates=(Aggregate(function='count_distinct', columns=(1,), separator=''),), outputs=(OutputColumn(name='status', expr=Slot(index=0), type_column=0, type_name=None), OutputColumn(name='buyers', expr=AggRef(index=0), type_column=None, type_name='bigint')), having=None, order=(), distinct=False, offset=0, limit=None, scalar=False, rows_column=None)

SELECT status, AVG(amount) AS a FROM orders GROUP BY status HAVING COUNT(*) > 10 ORDER BY a DESC LIMIT 3;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT status AS _a67_g0, SUM(amount) AS _a67_p1, COUNT(amount) AS _a67_p2, COUNT(*) AS _a67_p3 FROM orders GROUP BY status
-- merge: GroupedMerge(group_columns=(0,), carried_columns=(0,), aggregates=(Aggregate(function='avg', columns=(1, 2), separator=''), Aggregate(function='count', columns=(3,), separator='')), outputs=(OutputColumn(name='status', expr=Slot(index=0), type_column=0, type_name=None), OutputColumn(name='a', expr=AggRef(index=0), type_column=None, type_name=None)), having=Apply(op='>', args=(AggRef(index=1), Const(value=10)), param=''), order=(OrderTerm(expr=OutputRef(index=1), descending=True, nulls_first=True),), distinct=False, offset=0, limit=3, scalar=False, rows_column=None)

SELECT customer_id, SUM(amount) / COUNT(*) AS mean FROM orders GROUP BY 1;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT customer_id, SUM(amount) / COUNT(*) AS mean FROM orders GROUP BY 1
-- merge: RowsMerge(order=(), distinct=False, offset=0, limit=None, hidden=0)

SELECT c.region, COUNT(*) FROM orders o JOIN customers c ON c.customer_id = o.customer_id GROUP BY c.region;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT c.region AS _a67_g0, COUNT(*) AS _a67_p1 FROM orders AS o JOIN customers AS c ON c.customer_id = o.customer_id GROUP BY c.region
-- merge: GroupedMerge(group_columns=(0,), carried_columns=(0,), aggregates=(Aggregate(function='count', columns=(1,), separator=''),), outputs=(OutputColumn(name='region', expr=Slot(index=0), type_column=0, type_name=None), OutputColumn(name='count', expr=AggRef(index=0), type_column=None, type_name='bigint')), having=None, order=(), distinct=False, offset=0, limit=None, scalar=False, rows_column=None)

SELECT r.label, COUNT(*) FROM customers c JOIN regions r ON r.name = c.region GROUP BY r.label;
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT r.label AS _a67_g0, COUNT(*) AS _a67_p1 FROM customers AS c JOIN regions AS r ON r.name = c.region GROUP BY r.label
-- merge: GroupedMerge(group_columns=(0,), carried_columns=(0,), aggregates=(Aggregate(function='count', columns=(1,), separator=''),), outputs=(OutputColumn(name='label', expr=Slot(index=0), type_column=0, type_name=None), OutputColumn(name='count', expr=AggRef(index=0), type_column=None, type_name='bigint')), having=None, order=(), distinct=False, offset=0, limit=None, scalar=False, rows_column=None)

SELECT name FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.customer_id);
-- shards: [0, 1, 2, 3] (SELECT: every shard)
-- on [0, 1, 2, 3]: SELECT name FROM customers AS c WHERE EXISTS(SELECT 1 FROM orders AS o WHERE o.customer_id = c.customer_id)
-- merge: RowsMerge(order=(), distinct=False, offset=0, limit=None, hidden=0)

INSERT INTO orders (id, customer_id, amount) VALUES (1, 1, 9.5), (2, 2, NULL), (3, 3, 1), (4, 5, 2);
-- shards: [0, 2, 3] (INSERT: rows split by the sharding key)
-- on [0]: INSERT INTO orders (id, customer_id, amount) VALUES (1, 1, 9.5), (4, 5, 2)
-- on [2]: INSERT INTO orders (id, customer_id, amount) VALUES (2, 2, NULL)
-- on [3]: INSERT INTO orders (id, customer_id, amount) VALUES (3, 3, 1)
-- merge: WriteMerge(counts='sum')

UPDATE orders SET status = 'paid' WHERE customer_id IN (2, 3);
-- shards: [2, 3] (UPDATE: pruned on the sharding key)
-- on [2, 3]: UPDATE orders SET status = 'paid' WHERE customer_id IN (2, 3)
-- merge: WriteMerge(counts='sum')

DELETE FROM orders WHERE amount IS NULL;
-- shards: [0, 1, 2, 3] (DELETE: every shard)
-- on [0, 1, 2, 3]: DELETE FROM orders WHERE amount IS NULL
-- merge: WriteMerge(counts='sum')

INSERT INTO regions (name, label) VALUES ('eu', 'Europe');
-- shards: [0, 1, 2, 3] (write to a reference table: every shard)
-- on [0, 1, 2, 3]: INSERT INTO regions (name, label) VALUES ('eu', 'Europe')
-- merge: WriteMerge(counts='first')

CREATE TABLE payments (customer_id INT NOT NULL, id INT NOT NULL, PRIMARY KEY (customer_id, id));
-- shards: [0, 1, 2, 3] (DDL: every shard)
-- on [0, 1, 2, 3]: CREATE TABLE payments (customer_id INT NOT NULL, id INT NOT NULL, PRIMARY KEY (customer_id, id))
-- merge: WriteMerge(counts='first')
