{{/*
Names, labels, images, the Redis connection, the secret wiring and the checks that refuse
contradictory values. Every template includes "idforge.validate" once through the ConfigMap.
*/}}

{{- define "idforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name, at most 40 characters so that "-worker-gpu" and friends stay within 63. */}}
{{- define "idforge.fullname" -}}
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

{{- define "idforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; call with (dict "ctx" $ "component" "api"). */}}
{{- define "idforge.labels" -}}
helm.sh/chart: {{ include "idforge.chart" .ctx }}
{{ include "idforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: idforge
{{- end -}}

{{- define "idforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idforge.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "idforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "idforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag" of one of .Values.image.{api,workerGpu,workerCpu}; call with (list $ "api"). */}}
{{- define "idforge.image" -}}
{{- $ctx := index . 0 -}}
{{- $img := index $ctx.Values.image (index . 1) -}}
{{- printf "%s:%s" $img.repository (toString (default $ctx.Chart.AppVersion $img.tag)) -}}
{{- end -}}

{{- define "idforge.secretName" -}}
{{- default (printf "%s-secrets" (include "idforge.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "idforge.redisName" -}}
{{- printf "%s-redis" (include "idforge.fullname" .) -}}
{{- end -}}

{{/* The parsed redis.external.url (urlParse), or an empty dict. */}}
{{- define "idforge.externalRedis" -}}
{{- if .Values.redis.external.url -}}
{{- urlParse .Values.redis.external.url | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* The password in redis.external.url ("" when it has none). */}}
{{- define "idforge.externalRedisPassword" -}}
{{- $u := include "idforge.externalRedis" . | fromJson -}}
{{- $info := default "" $u.userinfo -}}
{{- if contains ":" $info -}}{{- regexReplaceAll "^[^:]*:" $info "" -}}{{- end -}}
{{- end -}}

{{/*
Where IDFORGE_REDIS_URL comes from:
  configmap  a URL without a password (external, or the bundled Redis without auth)
  secret     the chart's Secret (an external URL with a password) or secrets.existingSecret
             (redis.external.urlFromExistingSecret)
  expand     the bundled Redis with auth: the pod spec splices $(REDIS_PASSWORD) into the URL
*/}}
{{- define "idforge.redisUrlSource" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- ternary "expand" "configmap" .Values.redis.bundled.auth.enabled -}}
{{- else if .Values.redis.external.urlFromExistingSecret -}}
secret
{{- else if include "idforge.externalRedisPassword" . -}}
secret
{{- else -}}
configmap
{{- end -}}
{{- end -}}

{{/* The Redis URL without a password (bundled: the in-cluster Service). */}}
{{- define "idforge.redisPlainUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "idforge.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* "true" when pods get REDIS_PASSWORD from the Secret (bundled auth, KEDA's password). */}}
{{- define "idforge.redisPasswordEnv" -}}
{{- if and .Values.redis.bundled.enabled .Values.redis.bundled.auth.enabled -}}
true
{{- else if and .Values.keda.enabled .Values.redis.external.urlFromExistingSecret .Values.keda.redis.passwordFromSecret -}}
true
{{- else if and .Values.keda.enabled (include "idforge.externalRedisPassword" .) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the Secret holds IDFORGE_METRICS_TOKEN (GET /metrics then needs it). */}}
{{- define "idforge.hasMetricsToken" -}}
{{- if .Values.secrets.existingSecret -}}
{{- if .Values.secrets.existingSecretHasMetricsToken }}true{{ end -}}
{{- else if .Values.secrets.metricsToken -}}
true
{{- end -}}
{{- end -}}

{{/* IDFORGE_PUBLIC_URL: config.publicUrl, else the first ingress host, else the Service. */}}
{{- define "idforge.publicUrl" -}}
{{- if .Values.config.publicUrl -}}
{{- .Values.config.publicUrl -}}
{{- else if and .Values.api.ingress.enabled .Values.api.ingress.hosts -}}
{{- $host := (first .Values.api.ingress.hosts).host -}}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.api.ingress.tls) 0)) $host -}}
{{- else -}}
{{- printf "http://%s-api.%s.svc:%d" (include "idforge.fullname" .) .Release.Namespace (int .Values.api.service.port) -}}
{{- end -}}
{{- end -}}

{{/*
Environment of every idforge container besides the ConfigMap (envFrom): the secrets, each by
secretKeyRef, so a Secret missing a required key stops the pod with a message naming the key.
*/}}
{{- define "idforge.secretEnv" -}}
{{- $secret := include "idforge.secretName" . -}}
{{- range $key := list "IDFORGE_API_KEYS" "IDFORGE_SECRET_KEY" "IDFORGE_WEBHOOK_SECRET" "IDFORGE_S3_ACCESS_KEY_ID" "IDFORGE_S3_SECRET_ACCESS_KEY" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
{{- end }}
{{- if include "idforge.hasMetricsToken" . }}
- name: IDFORGE_METRICS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: IDFORGE_METRICS_TOKEN
{{- end }}
{{- if include "idforge.redisPasswordEnv" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: REDIS_PASSWORD
{{- end }}
{{- $source := include "idforge.redisUrlSource" . }}
{{- if eq $source "secret" }}
- name: IDFORGE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: IDFORGE_REDIS_URL
{{- else if eq $source "expand" }}
- name: IDFORGE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:6379/0" (include "idforge.redisName" .) .Release.Namespace | quote }}
{{- end }}
{{- end -}}

{{/* Rolls pods when the ConfigMap, the chart's Secret or the model registry changes. */}}
{{- define "idforge.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
checksum/models: {{ toJson .Values.models.registry | sha256sum }}
{{- end -}}

{{- define "idforge.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "idforge.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* Volumes and mounts shared by the two worker kinds; call with (list $ .Values.gpuWorker). */}}
{{- define "idforge.workerVolumes" -}}
{{- $ctx := index . 0 -}}
{{- $w := index . 1 -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $w.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: 1Gi
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $w.shmSizeLimit }}
{{- if eq $ctx.Values.models.volume.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $ctx.Values.models.volume.existingClaim }}
{{- else }}
- name: models
  emptyDir:
    sizeLimit: {{ $ctx.Values.models.volume.sizeLimit }}
{{- end }}
{{- if $ctx.Values.models.registry }}
- name: model-registry
  configMap:
    name: {{ include "idforge.fullname" $ctx }}-models
{{- end }}
{{- end -}}

{{- define "idforge.workerMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/idforge/.cache
- name: shm
  mountPath: /dev/shm
- name: models
  mountPath: /models
{{- if .Values.models.registry }}
- name: model-registry
  mountPath: /etc/idforge
  readOnly: true
{{- end }}
{{- end -}}

{{/* The init container that fetches and verifies models.prefetch; call with (list $ "workerGpu"). */}}
{{- define "idforge.prefetchModels" -}}
{{- $ctx := index . 0 -}}
{{- if $ctx.Values.models.prefetch }}
- name: fetch-models
  image: {{ include "idforge.image" . }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  command: ["idforge"]
  args: {{ concat (list "models" "verify") $ctx.Values.models.prefetch | toJson }}
  envFrom:
    - configMapRef:
        name: {{ include "idforge.fullname" $ctx }}
  env:
    {{- include "idforge.secretEnv" $ctx | trim | nindent 4 }}
  securityContext:
    {{- include "idforge.containerSecurityContext" $ctx | nindent 4 }}
  resources:
    requests:
      cpu: 500m
      memory: 1Gi
    limits:
      memory: 4Gi
  volumeMounts:
    {{- include "idforge.workerMounts" $ctx | trim | nindent 4 }}
{{- end }}
{{- end -}}

{{/*
Refuses values that contradict each other, naming them. values.schema.json has already checked
each value on its own.
*/}}
{{- define "idforge.validate" -}}
{{- $v := .Values -}}
{{- $c := $v.config -}}
{{- if not $v.secrets.existingSecret -}}
{{- /* `fail`, not `required`: helm lint only warns about a missing `required` value. */ -}}
{{- $needed := list
  (list "apiKeys" "IDFORGE_API_KEYS, comma-separated team:key or team:sha256:<hex> entries")
  (list "secretKey" "IDFORGE_SECRET_KEY, a long random string")
  (list "webhookSecret" "IDFORGE_WEBHOOK_SECRET, whsec_ + base64 of 24-64 random bytes")
  (list "s3AccessKeyId" "IDFORGE_S3_ACCESS_KEY_ID")
  (list "s3SecretAccessKey" "IDFORGE_S3_SECRET_ACCESS_KEY") -}}
{{- range $needed -}}
{{- if not (index $v.secrets (index . 0)) -}}
{{- fail (printf "secrets.%s is required: %s (or name a Secret holding it in secrets.existingSecret)" (index . 0) (index . 1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if le (int $c.visibilityTimeoutSeconds) (int $c.taskTimeLimitSeconds) -}}
{{- fail (printf "config.visibilityTimeoutSeconds (%d) must be larger than config.taskTimeLimitSeconds (%d): Redis would deliver a task that is still running a second time" (int $c.visibilityTimeoutSeconds) (int $c.taskTimeLimitSeconds)) -}}
{{- end -}}
{{- if and $c.taskSoftTimeLimitSeconds (ge (int $c.taskSoftTimeLimitSeconds) (int $c.taskTimeLimitSeconds)) -}}
{{- fail (printf "config.taskSoftTimeLimitSeconds (%d) must be below config.taskTimeLimitSeconds (%d)" (int $c.taskSoftTimeLimitSeconds) (int $c.taskTimeLimitSeconds)) -}}
{{- end -}}
{{- if ge (float64 $c.webhookBackoffMaxSeconds) (float64 $c.visibilityTimeoutSeconds) -}}
{{- fail (printf "config.webhookBackoffMaxSeconds (%v) must be below config.visibilityTimeoutSeconds (%d)" $c.webhookBackoffMaxSeconds (int $c.visibilityTimeoutSeconds)) -}}
{{- end -}}
{{- $external := or $v.redis.external.url $v.redis.external.urlFromExistingSecret -}}
{{- if and $external $v.redis.bundled.enabled -}}
{{- fail "redis: set either redis.external.url (or redis.external.urlFromExistingSecret) or redis.bundled.enabled, not both" -}}
{{- end -}}
{{- if not (or $external $v.redis.bundled.enabled) -}}
{{- fail "redis: set redis.external.url (redis://host:6379/0) or redis.bundled.enabled=true" -}}
{{- end -}}
{{- if and $v.redis.external.url $v.redis.external.urlFromExistingSecret -}}
{{- fail "redis: redis.external.url and redis.external.urlFromExistingSecret are exclusive" -}}
{{- end -}}
{{- if and $v.redis.external.urlFromExistingSecret (not $v.secrets.existingSecret) -}}
{{- fail "redis.external.urlFromExistingSecret needs secrets.existingSecret (the Secret holding IDFORGE_REDIS_URL)" -}}
{{- end -}}
{{- if and $v.secrets.existingSecret (include "idforge.externalRedisPassword" .) -}}
{{- fail "redis.external.url holds a password but secrets.existingSecret is set, so the chart makes no Secret to keep it in: put IDFORGE_REDIS_URL in that Secret and set redis.external.urlFromExistingSecret=true" -}}
{{- end -}}
{{- if and $v.redis.bundled.enabled $v.redis.bundled.auth.enabled (not $v.secrets.existingSecret) -}}
{{- if not $v.redis.bundled.auth.password -}}
{{- fail "redis.bundled.auth.password is required when redis.bundled.auth.enabled (or give secrets.existingSecret with REDIS_PASSWORD)" -}}
{{- end -}}
{{- end -}}
{{- if and (not $v.gpuWorker.enabled) (not (contains "gpu" $v.cpuWorker.queues)) -}}
{{- fail "gpuWorker.enabled=false leaves the gpu queue without a consumer: set cpuWorker.queues to gpu,cpu" -}}
{{- end -}}
{{- if and $v.keda.enabled (not $v.gpuWorker.enabled) -}}
{{- fail "keda.enabled scales the GPU workers, but gpuWorker.enabled is false" -}}
{{- end -}}
{{- if and $v.keda.enabled $v.gpuWorker.autoscaling.enabled -}}
{{- fail "keda.enabled and gpuWorker.autoscaling.enabled both scale the GPU workers (KEDA makes its own HPA): enable one" -}}
{{- end -}}
{{- if and $v.keda.enabled (gt (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) -}}
{{- fail (printf "keda.minReplicaCount (%d) is above keda.maxReplicaCount (%d)" (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) -}}
{{- end -}}
{{- if and $v.keda.enabled $v.redis.external.urlFromExistingSecret (not $v.keda.redis.address) -}}
{{- fail "keda.redis.address (host:port) is required with redis.external.urlFromExistingSecret: the chart cannot read the Redis URL for the KEDA trigger" -}}
{{- end -}}
{{- range $name, $hpa := dict "api" $v.api.autoscaling "gpuWorker" $v.gpuWorker.autoscaling -}}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above %s.autoscaling.maxReplicas (%d)" $name (int $hpa.minReplicas) $name (int $hpa.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.models.volume.type "pvc") (not $v.models.volume.existingClaim) -}}
{{- fail "models.volume.type=pvc needs models.volume.existingClaim (the PersistentVolumeClaim holding /models)" -}}
{{- end -}}
{{- if and $v.api.ingress.enabled (not $v.api.ingress.hosts) -}}
{{- fail "api.ingress.enabled needs at least one entry in api.ingress.hosts" -}}
{{- end -}}
{{- end -}}
