{{/* Resource names: the release name, suffixed with the chart's unless it already holds it. */}}
{{- define "lmcache-fs.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmcache-fs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component (engine or gc): call with (list $ "engine"). */}}
{{- define "lmcache-fs.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "lmcache-fs.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "lmcache-fs.kvClaim" -}}
{{- .Values.cache.existingClaim | default (printf "%s-kv" (include "lmcache-fs.fullname" .)) -}}
{{- end -}}

{{- define "lmcache-fs.weightsClaim" -}}
{{- .Values.weights.existingClaim | default (printf "%s-weights" (include "lmcache-fs.fullname" .)) -}}
{{- end -}}

{{- define "lmcache-fs.settingsFile" -}}
/etc/lmcache-fs/lmcache-fs.yaml
{{- end -}}

{{/* What the engines and the gc service share: the settings file and the cache volume. */}}
{{- define "lmcache-fs.settingsEnv" -}}
- name: LMCACHE_CONFIG_FILE
  value: {{ include "lmcache-fs.settingsFile" . }}
{{- end -}}

{{- define "lmcache-fs.integrityDir" -}}
/etc/lmcache-fs-integrity
{{- end -}}

{{- define "lmcache-fs.sharedMounts" -}}
- name: kv
  mountPath: {{ .Values.cache.mountPath }}
- name: settings
  mountPath: {{ include "lmcache-fs.settingsFile" . | dir }}
  readOnly: true
{{- if .Values.integrityKey.existingSecret }}
- name: integrity-key
  mountPath: {{ include "lmcache-fs.integrityDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "lmcache-fs.sharedVolumes" -}}
- name: kv
  persistentVolumeClaim:
    claimName: {{ include "lmcache-fs.kvClaim" . }}
- name: settings
  configMap:
    name: {{ include "lmcache-fs.fullname" . }}-settings
{{- with .Values.integrityKey.existingSecret }}
- name: integrity-key
  secret:
    secretName: {{ . }}
    defaultMode: 0400     # lmcache-fs refuses a key file others can read
{{- end }}
{{- end -}}

{{/* Prometheus annotations for a pod serving /metrics on the given port: (list $ PORT). */}}
{{- define "lmcache-fs.scrapeAnnotations" -}}
{{- if (index . 0).Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}
