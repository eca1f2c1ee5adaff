// The graphile-worker peer of drover-bench-engine: N no-op jobs through graphile-worker on a
// PostgreSQL database the bench created for this run (and drops afterwards).
//
//   node bench.js <database-url> <jobs> <batched|unbatched>
//
// 1. installs graphile-worker's schema (runMigrations);
// 2. enqueues the jobs with addJobs, in batches of 1,000, before any worker runs;
// 3. starts one worker (concurrentJobs 24, maxPoolSize 25, as on graphile-worker's
//    performance page) with a no-op task; `batched` adds the page's batching options
//    (localQueue.size 500, completeJobBatchDelay 0, failJobBatchDelay 0), `unbatched` leaves
//    them at their defaults (off);
// 4. times from just before the worker starts until the jobs table is empty (every job
//    completed and its completion committed), and stops the worker.
//
// Prints `phase start` and `phase end` around the timed part (the bench measures CPU between
// them) and, last, one line `result {...}` with the figures as JSON.
"use strict";

const { EventEmitter } = require("node:events");
const { run, runMigrations, makeWorkerUtils } = require("graphile-worker");

const CONCURRENT_JOBS = 24;
const MAX_POOL_SIZE = 25;
const ADD_BATCH = 1000;

async function main() {
  const [url, jobsArg, mode] = process.argv.slice(2);
  const jobs = Number(jobsArg);
  if (!url || !Number.isInteger(jobs) || jobs < 1 || !["batched", "unbatched"].includes(mode)) {
    throw new Error("usage: node bench.js <database-url> <jobs> <batched|unbatched>");
  }
  const schema = "graphile_worker";
  const logger = quietLogger();
  const shared = { connectionString: url, schema, logger, maxPoolSize: MAX_POOL_SIZE };

  await runMigrations(shared);
  const utils = await makeWorkerUtils(shared);
  const queued = async () =>
    Number(
      (
        await utils.withPgClient((client) =>
          client.query(`select count(*) as n from ${schema}._private_jobs`),
        )
      ).rows[0].n,
    );
  try {
    const addStart = performance.now();
    for (let added = 0; added < jobs; added += ADD_BATCH) {
      const n = Math.min(ADD_BATCH, jobs - added);
      await utils.addJobs(Array.from({ length: n }, () => ({ identifier: "noop", payload: {} })));
    }
    const addSeconds = (performance.now() - addStart) / 1000;
    const before = await queued();
    if (before !== jobs) {
      throw new Error(`${before} jobs queued, not ${jobs}`);
    }

    const batching =
      mode === "batched"
        ? { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 }
        : {};
    let succeeded = 0;
    let firstSeconds = null;
    let failed = 0;
    let allSucceeded;
    const allSucceededPromise = new Promise((resolve) => (allSucceeded = resolve));
    // Listening before the worker starts: its first jobs may complete before `run` resolves.
    const events = new EventEmitter();
    events.on("job:success", () => {
      if (firstSeconds === null) firstSeconds = (performance.now() - start) / 1000;
      succeeded += 1;
      if (succeeded >= jobs) allSucceeded();
    });
    events.on("job:failed", () => {
      failed += 1;
    });
    console.log("phase start");
    const cpuStart = process.cpuUsage();
    const start = performance.now();
    const runner = await run({
      ...shared,
      concurrency: CONCURRENT_JOBS,
      noHandleSignals: true,
      events,
      pollInterval: 2000,
      taskList: { noop: async () => {} },
      preset: { worker: { ...batching } },
    });
    await allSucceededPromise;
    const succeededSeconds = (performance.now() - start) / 1000;
    // Completions may still be in a batch: done when the table is empty.
    let left = await queued();
    while (left > 0) {
      await new Promise((resolve) => setTimeout(resolve, 5));
      left = await queued();
    }
    const seconds = (performance.now() - start) / 1000;
    const cpu = process.cpuUsage(cpuStart);
    console.log("phase end");
    await runner.stop();
    console.log(
      "result " +
        JSON.stringify({
          peer: "graphile-worker",
          version: require("graphile-worker/package.json").version,
          node: process.version,
          mode,
          jobs,
          concurrentJobs: CONCURRENT_JOBS,
          maxPoolSize: MAX_POOL_SIZE,
          batching,
          addSeconds,
          firstSeconds,
          succeededSeconds,
          seconds,
          jobsPerSecond: jobs / seconds,
          failed,
          nodeCpuMs: (cpu.user + cpu.system) / 1000,
        }),
    );
  } finally {
    await utils.release();
  }
}

/** graphile-worker's logger, with only warnings and errors (on stderr). */
function quietLogger() {
  const { Logger } = require("graphile-worker");
  return new Logger(() => (level, message) => {
    if (level === "error" || level === "warning") {
      console.error(`graphile-worker ${level}: ${message}`);
    }
  });
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error && error.stack ? error.stack : String(error));
    process.exit(1);
  },
);
