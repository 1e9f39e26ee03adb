{{/*
Names, labels and the pieces shared by several templates.
*/}}

{{- define "magnetar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "magnetar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "magnetar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "broker"). */}}
{{- define "magnetar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "magnetar.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component: (dict "ctx" $ "component" "broker"). */}}
{{- define "magnetar.labels" -}}
{{ include "magnetar.selectorLabels" . }}
helm.sh/chart: {{ include "magnetar.chart" .ctx }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: magnetar
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "magnetar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "magnetar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "magnetar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Resource names. */}}
{{- define "magnetar.broker.fullname" -}}{{ include "magnetar.fullname" . }}-broker{{- end -}}
{{- define "magnetar.bookie.fullname" -}}{{ include "magnetar.fullname" . }}-bookie{{- end -}}
{{- define "magnetar.etcd.fullname" -}}{{ include "magnetar.fullname" . }}-etcd{{- end -}}
{{- define "magnetar.minio.fullname" -}}{{ include "magnetar.fullname" . }}-minio{{- end -}}

{{/* "<ns>.svc.<cluster domain>" */}}
{{- define "magnetar.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* "host:port" of each etcd member (the chart's own StatefulSet, or etcd.externalEndpoints). */}}
{{- define "magnetar.etcd.endpoints" -}}
{{- $endpoints := list -}}
{{- if .Values.etcd.enabled -}}
{{- $name := include "magnetar.etcd.fullname" . -}}
{{- $domain := include "magnetar.svcDomain" . -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s-%d.%s.%s:%d" $name $i $name $domain (int $.Values.etcd.ports.client)) -}}
{{- end -}}
{{- else -}}
{{- if not .Values.etcd.externalEndpoints -}}
{{- fail "etcd.enabled is false: set etcd.externalEndpoints (host:port of each member)" -}}
{{- end -}}
{{- range .Values.etcd.externalEndpoints -}}
{{- if or (contains "://" .) (contains "/" .) -}}
{{- fail (printf "etcd.externalEndpoints: %q must be host:port, without a scheme or path" .) -}}
{{- end -}}
{{- $endpoints = append $endpoints . -}}
{{- end -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- end -}}

{{/* metadata_url of brokers and bookies: etcd://host:port[,host:port]/root */}}
{{- define "magnetar.metadataUrl" -}}
{{- $root := .Values.etcd.rootPath | trimPrefix "/" -}}
{{- if not $root -}}{{- fail "etcd.rootPath must not be empty" -}}{{- end -}}
{{- printf "etcd://%s/%s" (include "magnetar.etcd.endpoints" .) $root -}}
{{- end -}}

{{/* "ip:port" to listen on, bracketing IPv6 hosts: (dict "host" "0.0.0.0" "port" 6650). */}}
{{- define "magnetar.listenAddr" -}}
{{- if contains ":" .host -}}
{{- printf "[%s]:%d" .host (int .port) -}}
{{- else -}}
{{- printf "%s:%d" .host (int .port) -}}
{{- end -}}
{{- end -}}

{{/* "$(POD_IP):port" for the pod's environment, bracketed on IPv6 clusters (listenHost "::"):
(dict "ctx" $ "port" 6650). */}}
{{- define "magnetar.podAddr" -}}
{{- if contains ":" .ctx.Values.listenHost -}}
{{- printf "[$(POD_IP)]:%d" (int .port) -}}
{{- else -}}
{{- printf "$(POD_IP):%d" (int .port) -}}
{{- end -}}
{{- end -}}

{{/*
TOML rendering of a map from values (broker.config, bookie.config). Scalars first, then one
[table] per nested map. Numbers that are whole are written as integers (values arrive as floats),
strings as quoted basic strings, lists as inline arrays; null values are left out, so that
`--set broker.config.cache_bytes=null` falls back to Magnetar's default.
*/}}
{{- define "magnetar.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq $v (floor $v) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i -}}, {{ end -}}{{- include "magnetar.toml.value" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "cannot write %v (%s) as a TOML value" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* (dict "prefix" "ledger" "map" $m "where" "broker.config") */}}
{{- define "magnetar.toml.table" -}}
{{- $prefix := .prefix -}}
{{- $where := .where -}}
{{- range $k, $v := .map -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $k) -}}
{{- fail (printf "%s: key %q is not a TOML bare key (letters, digits, _ and -)" $where $k) -}}
{{- end -}}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ $k }} = {{ include "magnetar.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := .map -}}
{{- if kindIs "map" $v -}}
{{- $name := $k -}}
{{- if $prefix -}}{{- $name = printf "%s.%s" $prefix $k -}}{{- end }}

[{{ $name }}]
{{- include "magnetar.toml.table" (dict "prefix" $name "map" $v "where" $where) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A role's configuration: the user's map with the chart's keys added. Fails when the user's map
sets one of the chart's keys. (dict "user" .Values.broker.config "chart" $managed "where"
"broker.config" "hint" "...")
*/}}
{{- define "magnetar.toml.config" -}}
{{- $user := deepCopy (default dict .user) -}}
{{- range $k, $v := .chart -}}
{{- if hasKey $user $k -}}
{{- fail (printf "%s.%s is set by the chart (%s); remove it from %s" $.where $k (get $.hint $k) $.where) -}}
{{- end -}}
{{- end -}}
{{- include "magnetar.toml.table" (dict "prefix" "" "map" (merge $user .chart) "where" .where) -}}
{{- end -}}

{{/*
Pod anti-affinity from a "soft" / "hard" / "" setting, or the component's own affinity.
(dict "ctx" $ "component" "bookie" "mode" .Values.bookie.podAntiAffinity "affinity" .Values.bookie.affinity)
*/}}
{{- define "magnetar.affinity" -}}
{{- if .affinity -}}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- else if eq .mode "hard" -}}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "magnetar.selectorLabels" . | nindent 12 }}
{{- else if eq .mode "soft" -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "magnetar.selectorLabels" . | nindent 14 }}
{{- else if ne .mode "" -}}
{{- fail (printf "%s.podAntiAffinity must be \"soft\", \"hard\" or \"\", not %q" .component .mode) -}}
{{- end -}}
{{- end -}}

{{/* Topology spread over hostname and zone: (dict "ctx" $ "component" "bookie" "spread" .Values.bookie.topologySpread) */}}
{{- define "magnetar.topologySpread" -}}
{{- if .spread.enabled -}}
topologySpreadConstraints:
  {{- range $key, $topology := dict "hostname" "kubernetes.io/hostname" "zone" "topology.kubernetes.io/zone" }}
  {{- $c := get $.spread $key }}
  - maxSkew: {{ $c.maxSkew }}
    topologyKey: {{ $topology }}
    whenUnsatisfiable: {{ $c.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "magnetar.selectorLabels" $ | nindent 8 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* The S3 endpoint brokers use: objectStorage.endpoint, else the chart's MinIO when
minio.enabled, else "" (AWS S3). */}}
{{- define "magnetar.objectStorage.endpoint" -}}
{{- $endpoint := .Values.objectStorage.endpoint -}}
{{- if and (not $endpoint) .Values.minio.enabled -}}
{{- $endpoint = printf "http://%s.%s:%d" (include "magnetar.minio.fullname" .) (include "magnetar.svcDomain" .) (int .Values.minio.ports.api) -}}
{{- end -}}
{{- $endpoint -}}
{{- end -}}

{{/*
The broker's [offload] table (JSON: a map), from objectStorage and broker.config.offload. url,
endpoint, region, path_style and allow_http come from objectStorage; credentials come from a
Secret as AWS_* variables (magnetar.objectStorage.credentialsEnv), never from the ConfigMap.
Other keys of broker.config.offload (timeouts, part_bytes, cache_bytes...) are kept.
*/}}
{{- define "magnetar.offload.table" -}}
{{- $os := .Values.objectStorage -}}
{{- $user := get (default dict .Values.broker.config) "offload" | default dict -}}
{{- if not (kindIs "map" $user) -}}
{{- fail "broker.config.offload must be a map of [offload] keys" -}}
{{- end -}}
{{- $hint := dict
  "url" "from objectStorage.bucket and objectStorage.prefix"
  "endpoint" "from objectStorage.endpoint, or the chart's MinIO"
  "region" "from objectStorage.region"
  "path_style" "from objectStorage.pathStyle"
  "allow_http" "true for an http:// endpoint"
  "access_key_id" "credentials come from objectStorage.credentials.existingSecret as AWS_ACCESS_KEY_ID"
  "secret_access_key" "credentials come from objectStorage.credentials.existingSecret as AWS_SECRET_ACCESS_KEY"
-}}
{{- range $k := keys $hint | sortAlpha -}}
{{- if hasKey $user $k -}}
{{- fail (printf "broker.config.offload.%s is set by the chart (%s); remove it from broker.config.offload" $k (get $hint $k)) -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9.-]{3,63}$" (toString $os.bucket)) -}}
{{- fail (printf "objectStorage.bucket %q is not a bucket name (3 to 63 of a-z 0-9 . -)" (toString $os.bucket)) -}}
{{- end -}}
{{- $prefix := trimAll "/" (toString $os.prefix) -}}
{{- range $part := ternary (splitList "/" $prefix) (list) (ne $prefix "") -}}
{{- if or (not (regexMatch "^[A-Za-z0-9._-]+$" $part)) (eq $part ".") (eq $part "..") -}}
{{- fail (printf "objectStorage.prefix %q: segments may only hold A-Z a-z 0-9 - _ . (and not be . or ..)" (toString $os.prefix)) -}}
{{- end -}}
{{- end -}}
{{- $endpoint := include "magnetar.objectStorage.endpoint" . -}}
{{- if and $endpoint (not (or (hasPrefix "http://" $endpoint) (hasPrefix "https://" $endpoint))) -}}
{{- fail (printf "objectStorage.endpoint %q must start with http:// or https://" $endpoint) -}}
{{- end -}}
{{- $pathStyle := ne $endpoint "" -}}
{{- if kindIs "bool" $os.pathStyle -}}
{{- $pathStyle = $os.pathStyle -}}
{{- else if has (toString $os.pathStyle) (list "true" "false") -}}
{{- $pathStyle = eq (toString $os.pathStyle) "true" -}}
{{- else if ne (toString $os.pathStyle) "" -}}
{{- fail (printf "objectStorage.pathStyle must be true, false or \"\" (automatic), not %q" (toString $os.pathStyle)) -}}
{{- end -}}
{{- $table := dict
  "url" (ternary (printf "s3://%s/%s" $os.bucket $prefix) (printf "s3://%s" $os.bucket) (ne $prefix ""))
  "path_style" $pathStyle
  "allow_http" (hasPrefix "http://" $endpoint)
-}}
{{- if $endpoint -}}{{- $_ := set $table "endpoint" $endpoint -}}{{- end -}}
{{- if $os.region -}}{{- $_ := set $table "region" (toString $os.region) -}}{{- end -}}
{{- merge $table $user | toJson -}}
{{- end -}}

{{/*
The broker's [offload_policy] table (JSON: a map): broker.config.offload_policy plus the keys of
the offload.* values that are set (not ""). A key set in both places is refused.
*/}}
{{- define "magnetar.offloadPolicy.table" -}}
{{- $user := get (default dict .Values.broker.config) "offload_policy" | default dict -}}
{{- if not (kindIs "map" $user) -}}
{{- fail "broker.config.offload_policy must be a map of [offload_policy] keys" -}}
{{- end -}}
{{- $table := deepCopy $user -}}
{{- $names := dict
  "threshold" "threshold"
  "age" "age"
  "deletion_lag" "deletionLag"
  "max_concurrent_uploads" "maxConcurrentUploads"
  "max_upload_rate" "maxUploadRate"
-}}
{{- range $k := keys $names | sortAlpha -}}
{{- $v := get (default dict $.Values.offload) (get $names $k) -}}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") -}}
{{- if hasKey $user $k -}}
{{- fail (printf "broker.config.offload_policy.%s and offload.%s are both set; keep one" $k (get $names $k)) -}}
{{- end -}}
{{- $_ := set $table $k $v -}}
{{- end -}}
{{- end -}}
{{- $table | toJson -}}
{{- end -}}

{{/* AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of broker pods, from
objectStorage.credentials.existingSecret or the chart's MinIO Secret; empty when objectStorage is
disabled or neither is set (then the pod's cloud identity is used). Bookies get none: brokers do
all object-storage requests. */}}
{{- define "magnetar.objectStorage.credentialsEnv" -}}
{{- $os := .Values.objectStorage -}}
{{- if $os.enabled }}
{{- if $os.credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $os.credentials.existingSecret }}
      key: {{ $os.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $os.credentials.existingSecret }}
      key: {{ $os.credentials.secretAccessKeyKey }}
{{- else if .Values.minio.enabled }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "magnetar.minio.secretName" . }}
      key: rootUser
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "magnetar.minio.secretName" . }}
      key: rootPassword
{{- end }}
{{- end }}
{{- end -}}

{{- define "magnetar.minio.secretName" -}}
{{- default (include "magnetar.minio.fullname" .) .Values.minio.auth.existingSecret -}}
{{- end -}}

{{/* The bookies' ledger.ensemble_size check: brokers cannot create ledgers on fewer bookies. */}}
{{- define "magnetar.checkQuorum" -}}
{{- $ledger := default dict (get (default dict .Values.broker.config) "ledger") -}}
{{- $ensemble := int (default 2 (get $ledger "ensemble_size")) -}}
{{- if lt (int .Values.bookie.replicas) $ensemble -}}
{{- fail (printf "bookie.replicas (%d) is below broker.config.ledger.ensemble_size (%d): brokers could not create ledgers" (int .Values.bookie.replicas) $ensemble) -}}
{{- end -}}
{{- end -}}
