// A Node gRPC client for loraplane's control plane, built from protos/ at run time.
// Usage: node client.mjs ADDRESS TOKEN ADAPTER_DIR  -> prints one JSON object with what it saw.
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const protos = path.resolve(here, "../../protos");
const [address, token, adapterDir] = process.argv.slice(2);

const definition = protoLoader.loadSync(
  ["loraplane/v1/registry_service.proto", "loraplane/v1/errors.proto"],
  { includeDirs: [protos], keepCase: true, enums: String, longs: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).loraplane.v1;
const registry = new v1.AdapterRegistryService(address, grpc.credentials.createInsecure());

// google.rpc.Status and ErrorInfo are not in our protos; their wire format is stable and tiny.
const rpc = protobuf.parse(`
  syntax = "proto3"; package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`).root;

function call(method, request, withToken = true) {
  const md = new grpc.Metadata();
  if (withToken) md.set("authorization", `Bearer ${token}`);
  return new Promise((resolve) => {
    registry[method](request, md, { deadline: Date.now() + 30000 }, (err, response) => {
      if (!err) return resolve({ ok: true, response });
      const raw = err.metadata.get("grpc-status-details-bin")[0];
      let reason = "";
      if (raw) {
        const status = rpc.lookupType("google.rpc.Status").decode(raw);
        const info = status.details.find((d) => d.typeUrl.endsWith("google.rpc.ErrorInfo"));
        if (info) reason = rpc.lookupType("google.rpc.ErrorInfo").decode(info.value).reason;
      }
      resolve({ ok: false, code: grpc.status[err.code], reason });
    });
  });
}

const created = await call("CreateAdapter", { name: "from-node", source: adapterDir, wait: true });
const got = await call("GetAdapter", { name: "from-node" });
const listed = await call("ListAdapters", { page_size: 10 });
const missing = await call("GetAdapter", { name: "nobody-here" });
const anonymous = await call("ListAdapters", {}, false);
console.log(JSON.stringify({
  created_state: created.ok ? created.response.adapter.state : created,
  version: got.ok ? got.response.adapter.version : "",
  listed: listed.ok ? listed.response.adapters.map((a) => a.name) : [],
  missing: { code: missing.code, reason: missing.reason },
  anonymous: { code: anonymous.code, reason: anonymous.reason },
}));
registry.close();
