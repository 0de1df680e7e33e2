// One measured run of Nodemailer's pooled SMTP transport, for python -m benchmarks.tls:
//   node send.mjs --port P --count N --size K --ca FILE --message FILE [--concurrency 64] [--nodelay 1]
// Nodemailer leaves Nagle's algorithm on (it never calls setNoDelay): it writes a message
// and then its ".\r\n" terminator as two records, and the second waits for the peer's
// delayed ACK of the first (~40 ms on Linux) before the relay can answer. --nodelay 1
// sets TCP_NODELAY on every socket Nodemailer opens, to show what that stall costs.
// Prints RESULT {json}: sent, failed, wall and CPU seconds (process.cpuUsage) from
// creating the transport to closing it, like benchmarks/client.py.
import fs from "node:fs";
import net from "node:net";
import tls from "node:tls";
import nodemailer from "nodemailer";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, value, i, all) => (i % 2 ? pairs : [...pairs, [all[i].replace(/^--/, ""), all[i + 1]]]), []),
);
const count = Number(args.count);
if (args.nodelay === "1") {
  for (const module of [net, tls]) {
    const connect = module.connect;
    module.connect = (...rest) => connect.apply(module, rest).setNoDelay(true);
  }
}
const raw = fs.readFileSync(args.message);
const cpu0 = process.cpuUsage();
const wall0 = process.hrtime.bigint();
const transport = nodemailer.createTransport({
  pool: true,
  host: "127.0.0.1",
  port: Number(args.port),
  secure: true,
  maxConnections: Number(args.size),
  maxMessages: Infinity,
  tls: { ca: fs.readFileSync(args.ca) },
});
let remaining = count;
let sent = 0;
let failed = 0;
let error = "";
async function worker() {
  while (remaining > 0) {
    remaining -= 1;
    try {
      await transport.sendMail({ envelope: { from: "bench@example.org", to: ["user1@example.net"] }, raw });
      sent += 1;
    } catch (exc) {
      failed += 1;
      error ||= String(exc);
    }
  }
}
await Promise.all(Array.from({ length: Math.min(Number(args.concurrency ?? 64), count) }, worker));
transport.close();
const wall = Number(process.hrtime.bigint() - wall0) / 1e9;
const cpu = process.cpuUsage(cpu0);
console.log("RESULT " + JSON.stringify({ sent, failed, error, wall, cpu: (cpu.user + cpu.system) / 1e6 }));
