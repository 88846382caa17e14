{{/*
Naming and labels follow the kserve / `helm create` conventions.
*/}}

{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Truncated to 63 characters because some Kubernetes name fields are limited to
that (DNS-1123 labels). If the release name contains the chart name it is used
as the full name.
*/}}
{{- define "loraplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "loraplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: only chart-owned keys. Selectors are immutable, so nothing a
user sets (commonLabels, podLabels) may ever end up here.
*/}}
{{- define "loraplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraplane.standardLabels" -}}
helm.sh/chart: {{ include "loraplane.chart" . }}
{{ include "loraplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplane
{{- end }}

{{/*
Object labels. Merged as dicts (chart keys win) rather than concatenated, so a
commonLabels entry can neither duplicate a key nor override a selector label.
*/}}
{{- define "loraplane.labels" -}}
{{- $std := include "loraplane.standardLabels" . | fromYaml }}
{{- toYaml (merge $std (deepCopy (.Values.commonLabels | default dict))) }}
{{- end }}

{{/* Per-component selector labels. Call with (dict "ctx" $ "component" "control-plane"). */}}
{{- define "loraplane.componentSelectorLabels" -}}
{{ include "loraplane.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loraplane.componentLabels" -}}
{{- $std := include "loraplane.standardLabels" .ctx | fromYaml }}
{{- $_ := set $std "app.kubernetes.io/component" .component }}
{{- toYaml (merge $std (deepCopy (.ctx.Values.commonLabels | default dict))) }}
{{- end }}

{{/* Pod template labels: component labels plus podLabels, chart keys still winning. */}}
{{- define "loraplane.podLabels" -}}
{{- $labels := include "loraplane.componentLabels" . | fromYaml }}
{{- toYaml (merge $labels (deepCopy (.podLabels | default dict))) }}
{{- end }}

{{- define "loraplane.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplane.dataPlane.fullname" -}}
{{- printf "%s-data-plane" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplane.redis.fullname" -}}
{{- printf "%s-redis" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraplane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "image" .Values.x.image "ctx" $). A digest wins
over the tag; "latest" is refused because it makes rollbacks and node caches lie.
*/}}
{{- define "loraplane.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion | toString }}
{{- if eq (lower $tag) "latest" }}
{{- fail (printf "image %s: the tag \"latest\" is not allowed; pin a version" .image.repository) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
A base64 secret value that is stable across upgrades: the given value, else the
one already in the cluster (lookup; empty under `helm template`), else a new
random one. Call with (dict "ctx" $ "name" SECRET "key" KEY "value" GIVEN).
*/}}
{{- define "loraplane.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- $data := dig "data" dict ($existing | default dict) }}
{{- if .value }}
{{- .value | toString | b64enc }}
{{- else if hasKey $data .key }}
{{- index $data .key }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{- define "loraplane.authSecretName" -}}
{{- default (printf "%s-auth" (include "loraplane.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "loraplane.hf.enabled" -}}
{{- if or .Values.hf.token .Values.hf.existingSecret }}true{{ end }}
{{- end }}

{{- define "loraplane.hf.secretName" -}}
{{- default (printf "%s-hf" (include "loraplane.fullname" .)) .Values.hf.existingSecret }}
{{- end }}

{{- define "loraplane.hf.secretKey" -}}
{{- if .Values.hf.existingSecret }}{{ .Values.hf.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The Secret (and key) holding the Redis URL both planes connect with. */}}
{{- define "loraplane.redis.urlSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- else }}
{{- include "loraplane.redis.fullname" . }}
{{- end }}
{{- end }}

{{- define "loraplane.redis.urlSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecretKey }}
{{- else }}redis-url{{ end }}
{{- end }}

{{/*
Sentinel URL in the redis+sentinel:// form of the Redis-Sentinel-Url convention:
redis+sentinel://[:password@]host:port[,host:port...]/master/db
*/}}
{{- define "loraplane.redis.sentinelUrl" -}}
{{- $s := .Values.externalRedis.sentinel }}
{{- $auth := "" }}
{{- if $s.password }}{{ $auth = printf ":%s@" $s.password }}{{ end }}
{{- printf "redis+sentinel://%s%s/%s/%d" $auth (join "," $s.hosts) $s.masterName ($s.db | int) }}
{{- end }}

{{/*
Hash of the values behind the Secrets the pods read at start, so changing one
(a new Redis URL, a rotated token) rolls the pods. Values only, never lookups:
the hash must be the same on every render of the same values.
*/}}
{{- define "loraplane.secretsChecksum" -}}
{{- $v := .Values }}
{{- dict "redis" $v.redis.auth "externalRedis" $v.externalRedis "auth" $v.auth "hf" $v.hf "s3" $v.s3 | toJson | sha256sum }}
{{- end }}

{{- define "loraplane.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add (.gracePeriodSeconds | ceil | int) 15 }}
{{- else }}
{{- .terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/*
A native gRPC probe (no exec binary in the image). Call with
(dict "port" 50051 "service" "readiness" "timing" .Values.x.probes.readiness).
*/}}
{{- define "loraplane.grpcProbe" -}}
grpc:
  port: {{ .port | int }}
  service: {{ .service }}
{{- with .timing }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget budget: minAvailable when set, else maxUnavailable. */}}
{{- define "loraplane.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) }}
minAvailable: {{ .minAvailable }}
{{- else }}
maxUnavailable: {{ .maxUnavailable }}
{{- end }}
{{- end }}

{{/* Shared container cache locations, on an emptyDir because the root filesystem is read-only. */}}
{{- define "loraplane.cacheEnv" -}}
- name: XDG_CACHE_HOME
  value: /var/cache/loraplane
- name: HF_HOME
  value: /var/cache/loraplane/huggingface
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
{{- end }}

{{- define "loraplane.redisUrlEnv" -}}
- name: LORAPLANE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "loraplane.redis.urlSecretName" . }}
      key: {{ include "loraplane.redis.urlSecretKey" . }}
{{- end }}

{{- define "loraplane.hfTokenEnv" -}}
{{- if include "loraplane.hf.enabled" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "loraplane.hf.secretName" . }}
      key: {{ include "loraplane.hf.secretKey" . }}
{{- end }}
{{- if .Values.hf.endpoint }}
- name: HF_ENDPOINT
  value: {{ .Values.hf.endpoint | quote }}
{{- end }}
{{- end }}

{{/* Both planes read the tokens as files, so they never show up in the process environment. */}}
{{- define "loraplane.authVolume" -}}
- name: auth
  secret:
    secretName: {{ include "loraplane.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.existingSecretKeys.adminToken }}
        path: admin-token
      - key: {{ .Values.auth.existingSecretKeys.distributionToken }}
        path: distribution-token
{{- end }}

{{/*
TLS (tls.enabled): the Secret tls.secretName, mounted as a directory (no subPath, so a
renewed certificate reaches the files) at /etc/loraplane/tls on both planes.
*/}}
{{- define "loraplane.tls.volume" -}}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName | quote }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}

{{- define "loraplane.tls.volumeMount" -}}
- name: tls
  mountPath: /etc/loraplane/tls
  readOnly: true
{{- end }}

{{/*
Server flags, both planes. The kubelet's gRPC probes speak plaintext only, so
--health-listen opens a second port serving nothing but grpc.health.v1 (the
same statuses as the main port) and the probes target it.
*/}}
{{- define "loraplane.tls.serverArgs" -}}
- --tls-cert=/etc/loraplane/tls/tls.crt
- --tls-key=/etc/loraplane/tls/tls.key
{{- if .Values.tls.clientAuth }}
- --tls-client-ca=/etc/loraplane/tls/ca.crt
{{- end }}
- --health-listen=0.0.0.0:{{ .Values.tls.healthPort | int }}
{{- end }}

{{- define "loraplane.tls.healthContainerPort" -}}
- name: health
  containerPort: {{ .Values.tls.healthPort | int }}
  protocol: TCP
{{- end }}

{{/* The model directory the data plane loads; also where the download init container writes. */}}
{{- define "loraplane.dataPlane.modelPath" -}}
{{- $m := .Values.dataPlane.model }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (default .Values.model.id $m.dir | trimPrefix "/") }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express. Rendered from validate.yaml
so they run on install, upgrade, template and lint alike.
*/}}
{{- define "loraplane.validate" -}}
{{- $cp := .Values.controlPlane }}
{{- $multi := or (gt ($cp.replicas | int) 1) $cp.autoscaling.enabled }}
{{- if and $multi (not $cp.artifacts.persistence.enabled) }}
{{- fail "controlPlane.artifacts.persistence.enabled=false (emptyDir) needs controlPlane.replicas=1 and no autoscaling: every control-plane replica must see the same artifact store" }}
{{- end }}
{{- if and $multi $cp.artifacts.persistence.enabled (not $cp.artifacts.persistence.existingClaim) (not (has "ReadWriteMany" $cp.artifacts.persistence.accessModes)) }}
{{- fail "controlPlane.artifacts.persistence.accessModes must include ReadWriteMany when the control plane runs more than one replica (the artifact store is shared)" }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- if or .Values.externalRedis.url .Values.externalRedis.existingSecret .Values.externalRedis.sentinel.enabled }}
{{- fail "externalRedis is set but redis.enabled=true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- else }}
{{- $modes := 0 }}
{{- if .Values.externalRedis.url }}{{ $modes = add1 $modes }}{{ end }}
{{- if .Values.externalRedis.existingSecret }}{{ $modes = add1 $modes }}{{ end }}
{{- if .Values.externalRedis.sentinel.enabled }}{{ $modes = add1 $modes }}{{ end }}
{{- if ne (int $modes) 1 }}
{{- fail "redis.enabled=false needs exactly one of externalRedis.url, externalRedis.existingSecret or externalRedis.sentinel.enabled" }}
{{- end }}
{{- if and .Values.externalRedis.sentinel.enabled (not .Values.externalRedis.sentinel.hosts) }}
{{- fail "externalRedis.sentinel.hosts must list at least one host:port" }}
{{- end }}
{{- end }}
{{- if lt (.Values.dataPlane.maxCpuLoras | int) (.Values.dataPlane.maxLoras | int) }}
{{- fail (printf "dataPlane.maxCpuLoras (%d) must be >= dataPlane.maxLoras (%d): every adapter in a GPU slot is also held in the CPU tier" (.Values.dataPlane.maxCpuLoras | int) (.Values.dataPlane.maxLoras | int)) }}
{{- end }}
{{- range $name, $plane := dict "controlPlane" .Values.controlPlane "dataPlane" .Values.dataPlane }}
{{- $tgps := include "loraplane.terminationGracePeriodSeconds" $plane | int }}
{{- if le (float64 $tgps) (float64 $plane.gracePeriodSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed %s.gracePeriodSeconds, or the kubelet kills the pod before it drains" $name $tgps $name) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.dataPlane.model.source "download") (not .Values.model.id) }}
{{- fail "dataPlane.model.source=download needs model.id" }}
{{- end }}
{{- $tls := .Values.tls }}
{{- if and $tls.clientAuth (not $tls.enabled) }}
{{- fail "tls.clientAuth=true (mTLS) needs tls.enabled=true and tls.secretName" }}
{{- end }}
{{- if $tls.enabled }}
{{- if not $tls.secretName }}
{{- fail "tls.enabled=true needs tls.secretName: an existing kubernetes.io/tls Secret holding tls.crt, tls.key and ca.crt (e.g. from cert-manager)" }}
{{- end }}
{{- range $name, $port := dict "controlPlane.port" .Values.controlPlane.port "dataPlane.port" .Values.dataPlane.port "dataPlane.metricsPort" .Values.dataPlane.metricsPort }}
{{- if eq ($port | int) ($tls.healthPort | int) }}
{{- fail (printf "tls.healthPort (%d) must differ from %s: it is a separate, plaintext, health-only listener" ($tls.healthPort | int) $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
